"""A griffe extension for the API reference: Sphinx roles in docstrings become links.

metarl's docstrings cross-reference with Sphinx roles (``:func:`train```,
``:class:`~metarl.families.base.Family```). Markdown has no such syntax, so mkdocstrings
would show the role's name next to the code. This extension rewrites every role into an
optional autorefs cross-reference: a link where the target is documented on the site, the
name as code where it is not (private names, modules without a page), never a warning.
It also turns reST's ``text::`` (before a literal block) into ``text:``.

Names are resolved as Sphinx would: absolute paths first, then relative to the docstring's
object (its members, its module's imports and definitions). ``~`` shows the last
component only. Loaded by mkdocs.yml (``plugins: mkdocstrings: ... extensions``); it
changes the docstrings that griffe read for the site, never the source.
"""

from __future__ import annotations

import html
import re

import griffe

LITERAL = re.compile(r"(\S)::$", flags=re.MULTILINE)
ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|data|attr|obj|exc|const):`([^`]+)`")


def _exists(pkg: griffe.Module, path: str) -> bool:
    if path == pkg.path:
        return True
    if not path.startswith(pkg.path + "."):
        return False
    try:
        pkg[path[len(pkg.path) + 1:]]
    except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return False
    return True


def _resolve(pkg: griffe.Module, obj: griffe.Object, target: str) -> str:
    if _exists(pkg, target):
        return target
    head, _, tail = target.partition(".")
    try:
        base = obj.resolve(head)
    except griffe.NameResolutionError:
        return target
    return f"{base}.{tail}" if tail else base


def _rewrite(pkg: griffe.Module, obj: griffe.Object) -> None:
    docstring = obj.docstring
    if docstring is None:
        return
    # reST's "text::" before an indented literal block: the block is already a code block
    # in Markdown, so only the colon stays
    docstring.value = LITERAL.sub(r"\1:", docstring.value)
    if ":`" not in docstring.value:
        return

    def link(match: re.Match) -> str:
        text = match.group(1).strip()
        short = text.startswith("~")
        target = text.lstrip("~").rstrip("()")
        shown = target.rsplit(".", 1)[-1] if short else target
        identifier = html.escape(_resolve(pkg, obj, target), quote=True)
        return (f'<autoref identifier="{identifier}" optional>'
                f"<code>{html.escape(shown)}</code></autoref>")

    docstring.value = ROLE.sub(link, docstring.value)


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring of a package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            _rewrite(pkg, obj)
            stack.extend(m for m in obj.members.values() if not m.is_alias)
