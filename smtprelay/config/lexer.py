"""
The syntax of the configuration file: maddy's Caddyfile dialect, read into a
tree of L{Node}s.

Text is split into tokens (whitespace-separated words, C{"quoted words"},
C{{} and C{}}), tokens are grouped into logical lines, and lines into
C{name arg... [{ children }]} nodes.  C{{env:NAME}} is expanded in names and
arguments and C{import FILE} nodes are replaced by the nodes of FILE.  Every
node knows the file and line it came from; every syntax error is a
L{ConfigError} whose message starts with C{FILE:LINE:}.  Nothing here knows
what a directive means.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import attrs

from smtprelay.reading import CannotRead, readText

MAX_NESTING = 255
MAX_IMPORT_DEPTH = 10

_ENV = re.compile(r"\{env:([^{}]*)\}")


class ConfigError(Exception):
    """
    The configuration is invalid.

    @ivar errors: one C{FILE:LINE: message} per problem, in file order.
    """

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)

    @classmethod
    def at(cls, problems: Iterable[tuple[str, int, str]]) -> ConfigError:
        """
        The error of C{(FILE, LINE, message)} problems, in the order given.
        """
        return cls([f"{where(file, line)}: {message}" for file, line, message in problems])


def where(file: str, line: int) -> str:
    """
    @return: C{FILE:LINE}, the prefix of every configuration error.
    """
    return f"{file}:{line}"


@attrs.frozen
class Token:
    """
    One lexical token.

    @ivar kind: C{word}, C{open} (an unquoted C{{}), C{close} (an unquoted
        C{}}) or C{eol} (the end of a logical line).
    @ivar line: the line the token starts on.
    """

    kind: Literal["word", "open", "close", "eol"]
    text: str
    line: int


@attrs.frozen
class Node:
    """
    One directive: C{name args... [{ children }]}.

    @ivar rawArgs: the arguments as written, before C{{env:...}} expansion
        (to tell a password written in the file from one taken from the
        environment).
    @ivar block: whether the directive had a C{{ }} block (maybe empty).
    """

    name: str
    args: tuple[str, ...]
    file: str
    line: int
    children: tuple[Node, ...] = ()
    block: bool = False
    rawArgs: tuple[str, ...] = ()

    def where(self) -> str:
        """
        @return: C{FILE:LINE}, the prefix of this node's error messages.
        """
        return where(self.file, self.line)


def tokenize(text: str, filename: str) -> list[Token]:
    """
    Split C{text} into tokens.

    Quotes start only at the beginning of a word and may span lines; inside
    them only C{\\"} is an escape.  C{#} outside quotes starts a comment.  A
    backslash right before a newline joins the two lines.

    @raise ConfigError: a quoted word is not closed.
    """
    tokens: list[Token] = []
    word: list[str] = []
    start = line = 1
    inWord = quoted = comment = False
    quoteLine = 0

    def endWord() -> None:
        nonlocal inWord
        if inWord:
            text = "".join(word)
            kind: Literal["word", "open", "close"] = "word"
            if not quoted and text == "{":
                kind = "open"
            elif not quoted and text == "}":
                kind = "close"
            tokens.append(Token(kind, text, start))
            word.clear()
            inWord = False

    def endLine() -> None:
        if tokens and tokens[-1].kind != "eol":
            tokens.append(Token("eol", "", line))

    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        i += 1
        if quoted:
            if ch == "\\" and i < n and text[i] == '"':
                word.append('"')
                i += 1
            elif ch == '"':
                endWord()
                quoted = False
            else:
                if ch == "\n":
                    line += 1
                word.append(ch)
            continue
        if ch == "\n":
            endWord()
            endLine()
            line += 1
            comment = False
            continue
        if comment:
            continue
        if ch == "\\" and text.startswith("\n", i) or ch == "\\" and text.startswith("\r\n", i):
            endWord()
            i = text.index("\n", i) + 1
            line += 1
            continue
        if ch.isspace():
            endWord()
            continue
        if ch == "#":
            endWord()
            comment = True
            continue
        if not inWord:
            inWord = True
            start = line
            if ch == '"':
                quoted = True
                quoteLine = line
                continue
        word.append(ch)
    if quoted:
        raise ConfigError.at([(filename, quoteLine, "unterminated quoted string")])
    endWord()
    endLine()
    return tokens


def expandEnv(text: str, env: Mapping[str, str]) -> str:
    """
    Replace each C{{env:NAME}} in C{text} by the variable's value (empty
    when it is not set).  An incomplete C{{env:NAME} stays as it is.
    """
    return _ENV.sub(lambda m: env.get(m.group(1), ""), text)


def fromEnvironment(raw: str) -> bool:
    """
    Whether an argument as written (one of L{Node.rawArgs}) takes its value,
    or part of it, from C{{env:...}}.
    """
    return "{env:" in raw


@attrs.define
class _Reader:
    """
    Builds the node tree of one file from its tokens.
    """

    tokens: list[Token]
    filename: str
    env: Mapping[str, str]
    importDepth: int
    pos: int = 0

    def fail(self, line: int, message: str) -> ConfigError:
        return ConfigError.at([(self.filename, line, message)])

    def peek(self) -> Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def block(self, depth: int, opened: int | None) -> list[Node]:
        """
        Read nodes up to the end of the file (C{opened} is L{None}) or up
        to the C{}} closing the block opened on line C{opened}.
        """
        if depth > MAX_NESTING:
            raise self.fail(opened or 0, f"blocks nested too deeply (more than {MAX_NESTING})")
        nodes: list[Node] = []
        while True:
            token = self.peek()
            if token is None:
                if opened is not None:
                    raise self.fail(opened, "block opened here is not closed (missing })")
                return nodes
            self.pos += 1
            if token.kind == "eol":
                continue
            if token.kind == "close":
                if opened is None:
                    raise self.fail(token.line, "unexpected }")
                return nodes
            if token.kind == "open":
                raise self.fail(
                    token.line, "unexpected {: a block opens on the line of its directive"
                )
            if self.directive(token, depth, nodes):
                if opened is None:
                    raise self.fail(token.line, "unexpected }")
                return nodes

    def directive(self, name: Token, depth: int, into: list[Node]) -> bool:
        """
        Read one directive whose name is C{name} and append it (or what it
        imports) to C{into}.

        @return: whether the line ended with a C{}} closing the enclosing
            block.
        """
        raw: list[str] = []
        children: list[Node] = []
        block = closes = False
        while True:
            token = self.peek()
            if token is None or token.kind == "eol":
                break
            self.pos += 1
            if token.kind == "word":
                raw.append(token.text)
            elif token.kind == "close":
                closes = True
                break
            else:
                # The block may go on over lines or close on this one,
                # as in "source example.org { deliver_to &corp }".
                block = True
                children = self.block(depth + 1, token.line)
                after = self.peek()
                if after is not None and after.kind == "word":
                    raise self.fail(after.line, f'unexpected "{after.text}" after }}')
                if after is not None and after.kind == "close":
                    self.pos += 1
                    closes = True
                break
        node = Node(
            name=expandEnv(name.text, self.env),
            args=tuple(expandEnv(arg, self.env) for arg in raw),
            file=self.filename,
            line=name.line,
            children=tuple(children),
            block=block,
            rawArgs=tuple(raw),
        )
        if node.name == "import":
            into.extend(self.splice(node, depth))
        else:
            into.append(node)
        return closes

    def splice(self, node: Node, depth: int) -> list[Node]:
        """
        The nodes of the file an C{import} node names.
        """
        if len(node.args) != 1 or node.block:
            raise self.fail(node.line, "import: expected exactly one file name and no block")
        if self.importDepth >= MAX_IMPORT_DEPTH:
            raise self.fail(
                node.line, f"import: imports nested too deeply (more than {MAX_IMPORT_DEPTH})"
            )
        base = "" if self.filename.startswith("<") else os.path.dirname(self.filename)
        path = os.path.join(base, node.args[0])
        candidates = [path, path + ".conf"]
        for candidate in candidates:
            if os.path.isfile(candidate):
                path = candidate
                break
        try:
            text = readText(path)
        except CannotRead as e:
            raise self.fail(node.line, f"import: cannot read {path}: {e.reason}")
        reader = _Reader(tokenize(text, path), path, self.env, self.importDepth + 1)
        return reader.block(depth, None)


def parseTree(text: str, filename: str, env: Mapping[str, str], importDepth: int = 0) -> list[Node]:
    """
    Parse C{text} (the contents of C{filename}) into top-level nodes, with
    imports spliced in and environment variables expanded.

    @raise ConfigError: a syntax error (the first one found).
    """
    return _Reader(tokenize(text, filename), filename, env, importDepth).block(0, None)


def readTree(path: str, env: Mapping[str, str]) -> list[Node]:
    """
    Parse the file at C{path} like L{parseTree}.

    @raise ConfigError: the file cannot be read or has a syntax error.
    """
    try:
        text = readText(path)
    except CannotRead as e:
        raise ConfigError([str(e)]) from None
    return parseTree(text, path, env)
