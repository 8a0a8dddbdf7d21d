"""
Tests for L{smtprelay.relay.routing} (its tables built by
L{smtprelay.app.targets.makeRouter}) and the routing keys of
L{smtprelay.protocol.addresses}: which rule an envelope address matches.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smtprelay.protocol.addresses import domainKey, routingKeys, ruleKey
from smtprelay.config.model import Address, Destinations, Reject, Routing, Target
from smtprelay.protocol.replies import reply
from smtprelay.app.targets import makeRouter, targetRoute
from smtprelay.relay.routing import ByRecipient, Route, Router


def target(name: str) -> Target:
    return Target(name=name, protocol="smtp", endpoints=(Address("tcp", "127.0.0.1", 2526),))


CORP, LISTS, SMARTHOST = target("corp"), target("lists"), target("smarthost")


class KeyTests(SynchronousTestCase):
    """
    Rules and addresses meet as lower-case text with A-label domains.
    """

    def test_domainKey(self) -> None:
        self.assertEqual(domainKey("Example.ORG"), "example.org")
        self.assertEqual(domainKey("Bücher.Example"), "xn--bcher-kva.example")
        self.assertEqual(domainKey("xn--bcher-kva.example"), "xn--bcher-kva.example")
        self.assertEqual(domainKey("[IPv6:2001:DB8::1]"), "[ipv6:2001:db8::1]")
        for bad in ("", "a..b", "-x.example"):
            with self.subTest(bad):
                self.assertRaises(ValueError, domainKey, bad)

    def test_ruleKey(self) -> None:
        self.assertEqual(ruleKey("Lists.Example.NET"), "lists.example.net")
        self.assertEqual(ruleKey("Bob@Bücher.example"), "bob@xn--bcher-kva.example")
        self.assertRaises(ValueError, ruleKey, "@example.org")
        self.assertRaises(ValueError, ruleKey, "bob@")

    def test_routingKeys(self) -> None:
        """
        The whole address first, then the domain; nothing for the null
        sender or an address without a domain.
        """
        self.assertEqual(routingKeys(b"Bob@Example.ORG"), ("bob@example.org", "example.org"))
        self.assertEqual(
            routingKeys("jörg@bücher.example".encode()),
            ("jörg@xn--bcher-kva.example", "xn--bcher-kva.example"),
        )
        self.assertEqual(routingKeys(b'"a@b"@x.test'), ('"a@b"@x.test', "x.test"))
        self.assertEqual(routingKeys(b"u@[192.0.2.1]"), ("u@[192.0.2.1]", "[192.0.2.1]"))
        self.assertEqual(routingKeys(b"u@not_a..domain"), ("u@not_a..domain", "not_a..domain"))
        for none in (b"", b"postmaster", b"@x.test", b"u@"):
            with self.subTest(none):
                self.assertEqual(routingKeys(none), ())

    @given(
        st.from_regex(r"[A-Za-z0-9.+_-]{1,20}", fullmatch=True),
        st.lists(st.from_regex(r"[A-Za-z0-9]{1,10}", fullmatch=True), min_size=1, max_size=4),
    )
    def test_ruleMatchesItsAddress(self, local: str, labels: list[str]) -> None:
        """
        However a rule and an address are cased, the address's keys hold
        the rule's key, for the address rule and for the domain rule.
        """
        domain = ".".join(labels)
        address = f"{local}@{domain}"
        keys = routingKeys(address.swapcase().encode())
        self.assertEqual(keys, (ruleKey(address), ruleKey(domain)))


class RouterTests(SynchronousTestCase):
    """
    L{Router}: a decision for each sender and recipient.
    """

    def setUp(self) -> None:
        self.routes = {t.name: targetRoute(t, self.fail, self.fail) for t in (CORP, LISTS, SMARTHOST)}
        self.destinations = Destinations(
            (("lists.example.net", LISTS), ("boss@example.net", CORP),
             ("spam.test", Reject(550, "5.7.1", "no"))),
            SMARTHOST,
        )
        routing = Routing(
            (("example.org", CORP), ("blocked.test", Reject())), self.destinations
        )
        self.router = makeRouter(routing, lambda t: self.routes[t.name])

    def test_bySender(self) -> None:
        """
        A sender rule decides at MAIL; other senders (and the null sender)
        get the recipient routing.
        """
        self.assertIs(self.router.bySender(b"anyone@Example.Org"), self.routes["corp"])
        self.assertEqual(
            self.router.bySender(b"x@blocked.test"),
            reply(554, "5.7.0", "Message rejected due to a local policy"),
        )
        byRecipient = self.router.bySender(b"x@sub.example.org")
        self.assertIsInstance(byRecipient, ByRecipient)
        self.assertIs(self.router.bySender(b""), byRecipient)
        self.assertIsNone(self.router.only)

    def test_byRecipient(self) -> None:
        """
        The address rule beats its domain's; no parent-domain matching.
        """
        table = self.router.bySender(b"")
        assert isinstance(table, ByRecipient)
        byRecipient = lambda rcpt: self.router.byRecipient(table, rcpt)
        self.assertIs(byRecipient(b"a@LISTS.example.net"), self.routes["lists"])
        self.assertIs(byRecipient(b"Boss@example.net"), self.routes["corp"])
        self.assertIs(byRecipient(b"other@example.net"), self.routes["smarthost"])
        self.assertIs(byRecipient(b"a@sub.lists.example.net"), self.routes["smarthost"])
        self.assertIs(byRecipient(b"postmaster"), self.routes["smarthost"])
        self.assertEqual(byRecipient(b"a@spam.test"), reply(550, "5.7.1", "no"))

    def test_single(self) -> None:
        """
        One C{deliver_to}: every transaction goes to its route, chosen at
        MAIL, and it is the route C{auth forward} uses.
        """
        route = targetRoute(CORP, self.fail, self.fail)
        router = Router.single(route)
        self.assertIs(router.bySender(b"a@b.test"), route)
        self.assertIs(router.bySender(b""), route)
        self.assertIs(router.only, route)

    def test_oneRoutePerTarget(self) -> None:
        """
        A target used by several rules has one route (one failover, one
        connection pool).
        """
        made: list[Target] = []

        def routeFor(t: Target) -> Route:
            made.append(t)
            return targetRoute(t, self.fail, self.fail)

        makeRouter(Routing((("a.test", CORP),), Destinations((("b.test", CORP),), CORP)), routeFor)
        self.assertEqual(made, [CORP])
