"""Sphinx configuration of torchloom's documentation (``sphinx-build -W docs DIR``).

Pages are Markdown (MyST); the API reference comes from the docstrings (autodoc, Google style
through napoleon). Warnings are errors in CI (``scripts/test.sh``).
"""

project = "torchloom"
author = "the torchloom developers"
copyright = "2026, the torchloom developers"
root_doc = "index"
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "img"]
myst_heading_anchors = 3  # "page.md#a-heading" links resolve
myst_enable_extensions = ["colon_fence"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "undoc-members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" sections as fields, not duplicate attribute entries

html_theme = "furo"
html_title = "torchloom"


def _prose_attribute_docstrings() -> None:
    """An attribute's or property's docstring here is prose: "Whether X (None: not asked)" must
    not become a type "Whether X (None" (napoleon reads ``TYPE: text`` on a first line as a
    type). Types come from the annotations. Fails loudly if a Sphinx release renames the hook."""
    from sphinx.ext.napoleon.docstring import GoogleDocstring

    if not hasattr(GoogleDocstring, "_consume_inline_attribute"):
        raise RuntimeError("napoleon changed: review docs/conf.py's attribute docstring hook")

    def consume(self: GoogleDocstring) -> tuple[str, list[str]]:
        lines = [self._lines.next(), *self._dedent(self._consume_to_end())]
        return "", self.__class__(lines, self._config).lines()

    GoogleDocstring._consume_inline_attribute = consume  # type: ignore[method-assign]


_prose_attribute_docstrings()
