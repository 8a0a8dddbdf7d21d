"""
Tests for the project's documents: the configuration reference
(docs/configuration.md) and the parser agree, every configuration example
in the documents parses, and the documents stand alone.

The reference has one C{## ...} section per kind of block and one
C{### `name`} entry per directive, with a C{- Default:} line and examples in
fenced C{conf} blocks.  A block marked C{conf} is a whole file; C{conf KIND}
holds directives for the place L{_CONTEXTS} puts them in.
"""

from __future__ import annotations

import os
import re
import tempfile

import attrs
from twisted.trial.unittest import SynchronousTestCase

from smtprelay.config import ConfigError, loadString
from smtprelay.config.parser import DIRECTIVES

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REFERENCE = os.path.join(_ROOT, "docs", "configuration.md")

_SECTIONS = {
    "Top-level directives": "top level",
    "Listener directives": "listener",
    "Routing directives": "routing",
    "Target directives": "target",
    "The tls block": "tls",
    "The tls_client block": "tls_client",
}

_LISTENER = "smtp tcp://127.0.0.1:2525 {\nFRAGMENT\n}\n"
_RELAY = _LISTENER.replace("FRAGMENT", "deliver_to smtp tcp://127.0.0.1:2526")
_CONTEXTS = {
    "": "FRAGMENT",
    "top": "FRAGMENT\n" + _RELAY,
    "listener": _LISTENER.replace("FRAGMENT", "FRAGMENT\ndeliver_to smtp tcp://127.0.0.1:2526"),
    "routing": _LISTENER,
    "target": _LISTENER.replace("FRAGMENT", "deliver_to smtp tcp://127.0.0.1:2526 {\nFRAGMENT\n}"),
    "target.lmtp": _LISTENER.replace("FRAGMENT", "deliver_to lmtp unix:///run/lmtp {\nFRAGMENT\n}"),
    "tls": "tls /etc/smtprelay/cert.pem /etc/smtprelay/key.pem {\nFRAGMENT\n}\n" + _RELAY,
    "tls_client": "tls_client {\nFRAGMENT\n}\n" + _RELAY,
}
"""Where the directives of a C{conf KIND} example go: FRAGMENT is replaced
by them."""

_DEFAULT_CONTEXT = {
    "top level": "top",
    "listener": "listener",
    "target": "target",
    "tls": "tls",
    "tls_client": "tls_client",
}
"""Where a block kind's directive is written to compare it with its default."""

_ENV = {
    "SMARTHOST_PASSWORD": "secret",
    "TARGETS": "tcp://mx1.example.net:25,tcp://mx2.example.net:25",
    "LISTEN": "tcp://127.0.0.1:2525",
}
"""The environment the examples are parsed with: each variable they use."""

_FENCE = re.compile(r"^```(\S*)(?:[ \t]+(\S+))?[ \t]*$")
_ENTRY = re.compile(r"^### `([^`]+)`$")
_LITERAL_DEFAULT = re.compile(r"^- Default: `([^`]*)`$")


@attrs.define
class _Example:
    """
    A fenced C{conf} block: the directives, and the place they go in.
    """

    where: str
    context: str
    text: str


@attrs.define
class _Entry:
    """
    One C{### `name`} entry of the reference.

    @ivar default: the default when the entry gives it as one literal
        argument, else L{None}.
    """

    name: str
    kind: str
    default: str | None = None
    examples: list[_Example] = attrs.Factory(list)


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _examples(path: str) -> list[_Example]:
    """
    The fenced C{conf} blocks of the Markdown file at C{path}.
    """
    examples: list[_Example] = []
    lines = _read(path).splitlines()
    heading = ""
    fence: re.Match[str] | None = None
    body: list[str] = []
    for number, line in enumerate(lines, 1):
        if fence is None:
            if line.startswith("#"):
                heading = line
            fence = _FENCE.match(line)
            start = number
            body = []
        elif line.startswith("```"):
            if fence.group(1) == "conf":
                where = f"{os.path.basename(path)}:{start} ({heading})"
                examples.append(_Example(where, fence.group(2) or "", "\n".join(body)))
            fence = None
        else:
            body.append(line)
    return examples


def _entries() -> list[_Entry]:
    """
    The directive entries of the reference, with their examples.
    """
    entries: list[_Entry] = []
    kind: str | None = None
    examples = {example.where.split(" ", 1)[0]: example for example in _examples(_REFERENCE)}
    for number, line in enumerate(_read(_REFERENCE).splitlines(), 1):
        if line.startswith("## "):
            kind = _SECTIONS.get(line[3:])
        elif (match := _ENTRY.match(line)) and kind is not None:
            entries.append(_Entry(match.group(1), kind))
        elif (match := _LITERAL_DEFAULT.match(line)) and kind is not None and entries:
            entries[-1].default = match.group(1)
        example = examples.get(f"configuration.md:{number}")
        if example is not None and kind is not None and entries:
            entries[-1].examples.append(example)
    return entries


def _parse(text: str, directory: str) -> None:
    """
    Parse the configuration C{text} as the file C{directory}/relay.conf, as
    C{smtprelay-check --no-files} does: certificates, keys and users
    files are not read.  The parser does read C{file:} passwords and
    imported files, so each C{file:PATH} is pointed at a password file in
    C{directory} and each imported file is created there, empty.

    @raise ConfigError: the configuration is invalid.
    """
    password = os.path.join(directory, "password")
    with open(password, "w") as f:
        f.write("secret\n")
    for name in re.findall(r"^\s*import\s+(\S+)", text, re.MULTILINE):
        open(os.path.join(directory, name), "w").close()
    text = re.sub(r"file:\S+", "file:" + password, text)
    loadString(text, os.path.join(directory, "relay.conf"), _ENV)


class ReferenceTests(SynchronousTestCase):
    """
    docs/configuration.md documents exactly the directives the parser knows.
    """

    def setUp(self) -> None:
        self.entries = _entries()
        self.documented: dict[str, list[str]] = {}
        for entry in self.entries:
            self.documented.setdefault(entry.kind, []).append(entry.name)

    def test_everyDirectiveDocumented(self) -> None:
        """
        Every directive of every block kind the parser knows has an entry in
        that kind's section.
        """
        self.assertEqual(sorted(DIRECTIVES), sorted(_SECTIONS.values()))
        missing = [
            f"{kind}: {name}"
            for kind, names in DIRECTIVES.items()
            for name in sorted(set(names) - set(self.documented.get(kind, [])))
        ]
        self.assertEqual(missing, [], f"directives missing from {_REFERENCE}")
        self.assertIn("lmtp_split", self.documented["target"])

    def test_everyDocumentedDirectiveKnown(self) -> None:
        """
        Every entry of the reference is a directive the parser knows in that
        block, documented once.
        """
        unknown = [
            f"{kind}: {name}"
            for kind, names in self.documented.items()
            for name in sorted(set(names) - set(DIRECTIVES[kind]))
        ]
        self.assertEqual(unknown, [], "documented directives the parser does not know")
        for kind, names in self.documented.items():
            self.assertEqual(len(names), len(set(names)), f"{kind} directives documented twice")

    def test_everyDirectiveHasExample(self) -> None:
        """
        Every entry has an example that uses its directive.
        """
        for entry in self.entries:
            used = re.compile(rf"(^|{{)\s*{re.escape(entry.name)}(\s|$)", re.MULTILINE)
            self.assertTrue(
                any(used.search(example.text) for example in entry.examples),
                f"no example of {entry.kind} directive {entry.name}",
            )

    def test_defaults(self) -> None:
        """
        A default given as one literal value is what the parser assumes:
        writing the directive with it gives the configuration that leaving
        it out gives.
        """
        checked = 0
        for entry in self.entries:
            if entry.default is None:
                continue
            contexts = {example.context for example in entry.examples}
            context = "target.lmtp" if "target.lmtp" in contexts else _DEFAULT_CONTEXT[entry.kind]
            template = _CONTEXTS[context]
            explicit = template.replace("FRAGMENT", f"{entry.name} {entry.default}")
            implicit = template.replace("FRAGMENT", "")
            self.assertEqual(
                loadString(explicit, env={}),
                loadString(implicit, env={}),
                f"{entry.kind} directive {entry.name}: documented default {entry.default}",
            )
            checked += 1
        self.assertGreaterEqual(checked, 30)


class ExampleTests(SynchronousTestCase):
    """
    Every configuration example in the documents parses.
    """

    def assertParses(self, examples: list[_Example]) -> None:
        failures = []
        for example in examples:
            unknown = set(re.findall(r"\{env:([^{}]*)\}", example.text)) - set(_ENV)
            self.assertEqual(unknown, set(), f"{example.where}: add its variables to _ENV")
            with tempfile.TemporaryDirectory() as directory:
                try:
                    _parse(_CONTEXTS[example.context].replace("FRAGMENT", example.text), directory)
                except ConfigError as e:
                    failures.append(f"{example.where}:\n{e}")
        self.assertEqual(failures, [])

    def test_reference(self) -> None:
        """
        Every C{conf} block of docs/configuration.md parses in its place, and
        there are more of them than directives.
        """
        examples = _examples(_REFERENCE)
        self.assertGreater(len(examples), sum(len(names) for names in DIRECTIVES.values()))
        self.assertParses(examples)

    def test_readme(self) -> None:
        """
        The configuration examples of the README parse.
        """
        examples = _examples(os.path.join(_ROOT, "README.md"))
        self.assertGreaterEqual(len(examples), 2)
        self.assertParses(examples)

    def test_brokenExampleFails(self) -> None:
        """
        An example with an error is reported, so the checks above can fail.
        """
        with tempfile.TemporaryDirectory() as directory:
            with self.assertRaises(ConfigError):
                _parse(_CONTEXTS["target"].replace("FRAGMENT", "lmtp_split tempfail"), directory)


def _documents() -> list[str]:
    """
    The project's documents: the README and every page of docs/.
    """
    docs = os.path.join(_ROOT, "docs")
    pages = sorted(os.path.join(docs, name) for name in os.listdir(docs) if name.endswith(".md"))
    return [os.path.join(_ROOT, "README.md"), *pages]


def _anchors(path: str) -> set[str]:
    """
    The anchors GitHub gives the headings of the Markdown file at C{path}.
    """
    anchors = set()
    inFence = False
    for line in _read(path).splitlines():
        if line.startswith("```"):
            inFence = not inFence
        elif not inFence and (match := re.match(r"#+ (.*)", line)):
            anchors.add(re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-"))
    return anchors


class StandaloneTests(SynchronousTestCase):
    """
    The documents are all a user needs: no pointer to papers outside the
    project, and every link within it leads somewhere.
    """

    def test_noPrivatePapers(self) -> None:
        """
        No document names the project's private working papers, and no
        docstring or comment of the code cites them instead of stating its
        rule.
        """
        for path in _documents():
            text = _read(path)
            for word in ("../shared", "SPEC"):
                self.assertNotIn(word, text, f"{path} refers to {word}")
        citations = re.compile(r"\.\./shared|\bSPEC\b")
        for package in ("smtprelay", "tests"):
            for directory, _, names in os.walk(os.path.join(_ROOT, package)):
                for name in names:
                    path = os.path.join(directory, name)
                    if name.endswith(".py") and path != os.path.abspath(__file__):
                        self.assertEqual(citations.findall(_read(path)), [], path)

    def test_links(self) -> None:
        """
        Every relative link names a file of the project, and a heading of
        it when the link has an anchor.
        """
        broken = []
        for path in _documents():
            for link in re.findall(r"\]\(([^)\s]+)\)", _read(path)):
                if re.match(r"[a-z]+:", link):
                    continue
                target, _, anchor = link.partition("#")
                resolved = os.path.normpath(os.path.join(os.path.dirname(path), target)) if target else path
                if not os.path.exists(resolved):
                    broken.append(f"{os.path.relpath(path, _ROOT)}: {link}")
                elif anchor and anchor not in _anchors(resolved):
                    broken.append(f"{os.path.relpath(path, _ROOT)}: {link} (no such heading)")
        self.assertEqual(broken, [])
