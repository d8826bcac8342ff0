"""A griffe extension for the API reference (docs/api/): Sphinx roles become cross-references.

The library's docstrings are Google style with Sphinx roles (``:class:`Proximal```,
``:func:`~bilevel.tree.tree_norm```), so that they read well in ``help()``.  mkdocstrings
does not understand roles and would print them verbatim.  This extension rewrites each role
when griffe loads ``bilevel``:

* into a mkdocstrings cross-reference ``[`Proximal`][bilevel.Proximal]`` when its target is
  a name the API reference renders (a public name of one of the documented modules, or a
  public member of one), written with the public path a user imports it from;
* into inline code otherwise (a private helper, a parameter, an external name), so that a
  reference never points at a page that does not exist (``mkdocs build --strict`` fails on
  those).

It also turns the reST literal-block marker (a line ending in ``::``) into a plain colon:
the indented block after it is already a code block in Markdown.

Only the rendering changes; the source docstrings are untouched.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

#: The modules the API reference documents, each with its ``__all__``.
PUBLIC_MODULES = (
    "bilevel",
    "bilevel.solvers",
    "bilevel.linsolve",
    "bilevel.testing",
    "bilevel.distributed",
    "bilevel.tree",
)

ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj):`(~?)([^`<>]+)`")
LITERAL_MARKER = re.compile(r"(\S)::[ \t]*$", re.MULTILINE)


def _get(pkg: griffe.Module, path: str) -> Any:
    return pkg if path == pkg.path else pkg[path.removeprefix(pkg.path + ".")]


def _target(obj: Any) -> Any:
    return obj.final_target if obj.is_alias else obj


class SphinxRoles(griffe.Extension):
    """Rewrites the Sphinx roles of ``bilevel``'s docstrings (see the module docstring)."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != "bilevel":
            return
        # canonical path (where a name is defined) -> public path (where it is documented)
        self.public: dict[str, str] = {}
        self.by_name: dict[str, set[str]] = {}
        for modpath in PUBLIC_MODULES:
            mod = _get(pkg, modpath)
            self._add(mod.path, modpath)
            for name in mod.exports or ():
                member = mod.members.get(str(name))
                if member is None:
                    continue
                try:
                    self._add(_target(member).path, f"{modpath}.{name}")
                except griffe.AliasResolutionError:
                    continue
        self._rewrite(pkg, set())

    def _add(self, canonical: str, public: str) -> None:
        self.public.setdefault(canonical, public)
        self.by_name.setdefault(public.rsplit(".", 1)[-1], set()).add(public)

    def _rewrite(self, obj: Any, seen: set[str]) -> None:
        if obj.is_alias or obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            text = ROLE.sub(lambda m: self._role(obj, m.group(1) == "~", m.group(2)), obj.docstring.value)
            obj.docstring.value = LITERAL_MARKER.sub(r"\1:", text)
        for member in obj.members.values():
            self._rewrite(member, seen)

    def _public_path(self, canonical: str) -> str | None:
        """The documented path of ``canonical`` (a public name, or a public member of one)."""
        if canonical in self.public:
            return self.public[canonical]
        owner, _, attr = canonical.rpartition(".")
        if owner in self.public and not attr.startswith("_"):
            return f"{self.public[owner]}.{attr}"
        return None

    def _resolve(self, obj: Any, name: str) -> str | None:
        head, _, rest = name.partition(".")
        if name.startswith("bilevel"):
            canonical: str | None = name
        else:
            try:
                canonical = obj.resolve(head) + (f".{rest}" if rest else "")
            except (griffe.NameResolutionError, AttributeError):
                # Not in scope where the docstring is: a unique public name of that name.
                found = self.by_name.get(head, set())
                canonical = next(iter(found)) + (f".{rest}" if rest else "") if len(found) == 1 else None
        if canonical is None:
            return None
        if canonical not in self.public:  # an alias's path: follow it to where it is defined
            try:
                canonical = _target(_get(obj.package, canonical)).path
            except (KeyError, ValueError, griffe.AliasResolutionError):
                return None
        public = self._public_path(canonical)
        if public is None or not self._rendered(obj.package, canonical):
            return None
        return public

    @staticmethod
    def _rendered(pkg: griffe.Module, canonical: str) -> bool:
        """Whether the API reference renders ``canonical``: it has a docstring (the pages
        show no name without one) and no private component after the module."""
        try:
            target = _target(_get(pkg, canonical))
        except (KeyError, ValueError, griffe.AliasResolutionError):
            return False
        return target.is_module or target.docstring is not None

    def _role(self, obj: Any, short: bool, name: str) -> str:
        name = name.strip().removesuffix("()")
        text = name.rsplit(".", 1)[-1] if short else name
        public = self._resolve(obj, name)
        return f"[`{text}`][{public}]" if public else f"`{text}`"
