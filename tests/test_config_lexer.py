"""
Tests for L{smtprelay.config.lexer}: maddy's parser cases.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, ClassVar

from twisted.trial.unittest import SynchronousTestCase

from smtprelay.config.lexer import (
    MAX_IMPORT_DEPTH,
    MAX_NESTING,
    ConfigError,
    Node,
    parseTree,
    readTree,
)


def _shape(nodes: list[Node] | tuple[Node, ...]) -> list[Any]:
    """
    Nodes as nested C{(name, args, children)} tuples, the block marker and
    line left out.
    """
    return [(n.name, list(n.args), _shape(n.children)) for n in nodes]


def _tree(text: str, env: Mapping[str, str] | None = None) -> list[Any]:
    return _shape(parseTree(text, "t.conf", env or {}))


def _error(text: str, env: Mapping[str, str] | None = None) -> list[str]:
    try:
        parseTree(text, "t.conf", env or {})
    except ConfigError as e:
        return e.errors
    raise AssertionError("no ConfigError")


class TreeTests(SynchronousTestCase):
    """
    Text to node tree.
    """

    CASES: ClassVar[list[tuple[str, str, list[Any]]]] = [
        ("empty", "", []),
        ("only comments", "# a\n   # b\n", []),
        ("directive", "a b c", [("a", ["b", "c"], [])]),
        ("two directives", "a b\nc d\n", [("a", ["b"], []), ("c", ["d"], [])]),
        ("blank lines", "\n\n a  b \n\n", [("a", ["b"], [])]),
        ("tabs and CRLF", "a\tb\r\nc\r\n", [("a", ["b"], []), ("c", [], [])]),
        ("block", "a b {\n c d\n}\n", [("a", ["b"], [("c", ["d"], [])])]),
        ("empty block", "a {\n}\n", [("a", [], [])]),
        (
            "nested",
            "a {\n b {\n  c\n }\n d\n}",
            [("a", [], [("b", [], [("c", [], [])]), ("d", [], [])])],
        ),
        ("brace on child line", "a {\n b c }\nd", [("a", [], [("b", ["c"], [])]), ("d", [], [])]),
        (
            "nested braces closing on one line",
            "a {\n b {\n  c }\n}",
            [("a", [], [("b", [], [("c", [], [])])])],
        ),
        ("comment after args", "a b # c d\ne", [("a", ["b"], []), ("e", [], [])]),
        ("comment inside a word", "a b#c\n", [("a", ["b"], [])]),
        ("comment in block", "a {\n # x }\n b\n}", [("a", [], [("b", [], [])])]),
        ("quoted", 'a "b c" d', [("a", ["b c", "d"], [])]),
        ("empty quoted", 'a ""', [("a", [""], [])]),
        ("quoted hash", 'a "b # c"', [("a", ["b # c"], [])]),
        ("quoted braces are words", 'a "{" "}"', [("a", ["{", "}"], [])]),
        ("escaped quote", r'a "b \"c\" d"', [("a", ['b "c" d'], [])]),
        ("other backslashes kept", r'a "b\n\\c"', [("a", [r"b\n\\c"], [])]),
        ("quote spanning lines", 'a "b\nc" d\ne', [("a", ["b\nc", "d"], []), ("e", [], [])]),
        ("quote inside a word is literal", 'a b"c', [("a", ['b"c'], [])]),
        ("continuation", "a b \\\n  c\nd", [("a", ["b", "c"], []), ("d", [], [])]),
        ("continuation CRLF", "a b\\\r\nc", [("a", ["b", "c"], [])]),
        ("backslash inside a line", "a b\\c", [("a", ["b\\c"], [])]),
        ("brace inside a word", "a b{ }c", [("a", ["b{", "}c"], [])]),
    ]

    def test_cases(self) -> None:
        for name, text, expected in self.CASES:
            with self.subTest(name):
                self.assertEqual(_tree(text), expected)

    def test_lines(self) -> None:
        """
        A node's line is the line of its name; lines inside quotes and after
        continuations count.
        """
        nodes = parseTree('a "x\ny"\nb \\\nc\n\nd {\n e\n}', "t.conf", {})
        self.assertEqual([(n.name, n.line) for n in nodes], [("a", 1), ("b", 3), ("d", 6)])
        self.assertEqual(nodes[2].children[0].line, 7)
        self.assertEqual(nodes[0].file, "t.conf")

    def test_block_marker(self) -> None:
        """
        An empty block is told apart from no block.
        """
        empty, none = parseTree("a {\n}\nb", "t.conf", {})
        self.assertTrue(empty.block)
        self.assertFalse(none.block)


    def test_oneLineBlocks(self) -> None:
        """
        A block may open and close on its directive's line (as in
        C{source example.org { deliver_to &corp }}), also nested and empty.
        """
        a, b, c = parseTree("a x { b y }\nb { c { d } }\nc { }", "t.conf", {})
        self.assertEqual((a.args, [(n.name, n.args) for n in a.children]), (("x",), [("b", ("y",))]))
        self.assertEqual([n.name for n in b.children], ["c"])
        self.assertEqual([n.name for n in b.children[0].children], ["d"])
        self.assertTrue(c.block)
        self.assertEqual(c.children, ())


class SyntaxErrorTests(SynchronousTestCase):
    """
    Malformed text: one error with the right line.
    """

    CASES: ClassVar[list[Any]] = [
        ("unclosed block", "a {\n b\n", "t.conf:1: block opened here is not closed (missing })"),
        ("stray close", "a\n}\n", "t.conf:2: unexpected }"),
        ("close ending a top line", "a b }\n", "t.conf:1: unexpected }"),
        (
            "open on its own line",
            "a\n{\n b\n}",
            "t.conf:2: unexpected {: a block opens on the line of its directive",
        ),
        ("word after close", "a {\n b\n} c", 't.conf:3: unexpected "c" after }'),
        ("two directives on a line", "a { b { c } d }", 't.conf:1: unexpected "d" after }'),
        ("unterminated quote", 'a\nb "c\nd', "t.conf:2: unterminated quoted string"),
    ]

    def test_cases(self) -> None:
        for name, text, expected in self.CASES:
            with self.subTest(name):
                self.assertEqual(_error(text), [expected])

    def test_nesting_limit(self) -> None:
        """
        C{MAX_NESTING} levels of blocks are fine, one more is an error.
        """

        def nested(depth: int) -> str:
            return "a {\n" * depth + "b\n" + "}\n" * depth

        self.assertEqual(len(_tree(nested(MAX_NESTING))), 1)
        [error] = _error(nested(MAX_NESTING + 1))
        self.assertIn("blocks nested too deeply", error)
        self.assertTrue(error.startswith(f"t.conf:{MAX_NESTING + 1}: "))


class EnvTests(SynchronousTestCase):
    """
    C{{env:NAME}} in names and arguments.
    """

    def test_set(self) -> None:
        self.assertEqual(
            _tree("a{env:X} {env:X}b {env:Y}", {"X": "1", "Y": "two words"}),
            [("a1", ["1b", "two words"], [])],
        )

    def test_quoted(self) -> None:
        self.assertEqual(_tree('a "x {env:X} y"', {"X": "1"}), [("a", ["x 1 y"], [])])

    def test_unset(self) -> None:
        """
        An unset variable is the empty string; the argument stays.
        """
        self.assertEqual(_tree("a {env:NOPE} b", {}), [("a", ["", "b"], [])])

    def test_incomplete(self) -> None:
        self.assertEqual(_tree("a {env:X", {"X": "1"}), [("a", ["{env:X"], [])])

    def test_value_is_not_syntax(self) -> None:
        """
        A value holding C{{}, C{#} or quotes is one plain argument.
        """
        self.assertEqual(_tree("a {env:X}", {"X": '{ # "'}), [("a", ['{ # "'], [])])

    def test_rawArgs(self) -> None:
        [node] = parseTree("a {env:X} y", "t.conf", {"X": "1"})
        self.assertEqual(node.rawArgs, ("{env:X}", "y"))
        self.assertEqual(node.args, ("1", "y"))

    def test_default_environment(self) -> None:
        """
        L{readTree} reads the process environment.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("a {env:SMTPRELAY_TEST_VARIABLE}\n")
        os.environ["SMTPRELAY_TEST_VARIABLE"] = "v"
        self.addCleanup(os.environ.pop, "SMTPRELAY_TEST_VARIABLE")
        self.assertEqual(_shape(readTree(path, os.environ)), [("a", ["v"], [])])


class ImportTests(SynchronousTestCase):
    """
    C{import FILE}.
    """

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(os.path.join(self.dir, "sub"))

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_relative(self) -> None:
        """
        Imports are relative to the importing file and are spliced in place,
        at the top level and inside blocks.
        """
        main = self.write("main", "a\nimport sub/one\nb {\n import sub/one\n}\n")
        self.write("sub/one", "x 1\nimport two\n")
        self.write("sub/two", "y 2\n")
        self.assertEqual(
            _shape(readTree(main, {})),
            [
                ("a", [], []),
                ("x", ["1"], []),
                ("y", ["2"], []),
                ("b", [], [("x", ["1"], []), ("y", ["2"], [])]),
            ],
        )

    def test_conf_fallback(self) -> None:
        main = self.write("main", "import other\n")
        self.write("other.conf", "z\n")
        self.assertEqual(_shape(readTree(main, {})), [("z", [], [])])

    def test_exact_name_first(self) -> None:
        main = self.write("main", "import other\n")
        self.write("other", "exact\n")
        self.write("other.conf", "fallback\n")
        self.assertEqual(_shape(readTree(main, {})), [("exact", [], [])])

    def test_file_and_line(self) -> None:
        """
        Imported nodes carry the imported file's name and lines.
        """
        main = self.write("main", "a\nimport other\n")
        other = self.write("other.conf", "\n\nz\n")
        nodes = readTree(main, {})
        self.assertEqual([(n.file, n.line) for n in nodes], [(main, 1), (other, 3)])

    def test_env_in_name(self) -> None:
        main = self.write("main", "import {env:PART}\n")
        self.write("other", "z\n")
        self.assertEqual(_shape(readTree(main, {"PART": "other"})), [("z", [], [])])

    def test_missing(self) -> None:
        main = self.write("main", "a\nimport nope\n")
        with self.assertRaises(ConfigError) as e:
            readTree(main, {})
        [error] = e.exception.errors
        self.assertTrue(error.startswith(f"{main}:2: import: cannot read "), error)

    def test_arguments(self) -> None:
        main = self.write("main", "import a b\n")
        with self.assertRaises(ConfigError) as e:
            readTree(main, {})
        self.assertEqual(
            e.exception.errors, [f"{main}:1: import: expected exactly one file name and no block"]
        )

    def test_recursion(self) -> None:
        """
        A file importing itself stops at the import depth limit, reported
        in the file and on the line of the import.
        """
        main = self.write("main", "a\nimport main\n")
        with self.assertRaises(ConfigError) as e:
            readTree(main, {})
        self.assertEqual(
            e.exception.errors,
            [f"{main}:2: import: imports nested too deeply (more than {MAX_IMPORT_DEPTH})"],
        )

    def test_depth_limit(self) -> None:
        """
        A chain of C{MAX_IMPORT_DEPTH} imports is fine.
        """
        for i in range(MAX_IMPORT_DEPTH):
            self.write(f"f{i}", f"import f{i + 1}\n")
        self.write(f"f{MAX_IMPORT_DEPTH}", "end\n")
        self.assertEqual(_shape(readTree(os.path.join(self.dir, "f0"), {})), [("end", [], [])])

    def test_syntax_error_in_import(self) -> None:
        main = self.write("main", "import other\n")
        other = self.write("other", "a {\n")
        with self.assertRaises(ConfigError) as e:
            readTree(main, {})
        self.assertEqual(
            e.exception.errors, [f"{other}:1: block opened here is not closed (missing }})"]
        )

    def test_unbalanced_import(self) -> None:
        """
        An imported file cannot close the importing file's block.
        """
        main = self.write("main", "a {\n import other\n}\n")
        other = self.write("other", "b }\n")
        with self.assertRaises(ConfigError) as e:
            readTree(main, {})
        self.assertEqual(e.exception.errors, [f"{other}:1: unexpected }}"])


class ReadTreeTests(SynchronousTestCase):
    def test_missing_file(self) -> None:
        with self.assertRaises(ConfigError) as e:
            readTree("/nonexistent/relay.conf", {})
        self.assertEqual(
            e.exception.errors, ["/nonexistent/relay.conf: cannot read: No such file or directory"]
        )

    def test_error_str(self) -> None:
        error = ConfigError(["a:1: x", "a:2: y"])
        self.assertEqual(str(error), "a:1: x\na:2: y")
        self.assertEqual(error.errors, ["a:1: x", "a:2: y"])
