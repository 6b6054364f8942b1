"""The embedded corpus: the standard library's docstrings (prose) and sources (code)."""

from __future__ import annotations

from herd.data.embedded.corpus import module_docstrings, stdlib_code, stdlib_dir, stdlib_files, stdlib_prose

MODULE = '''"""Tools for widgets."""
import os


class Widget(Base):
    """A widget."""

    def spin(self, times=1):
        """Spin ``times`` times."""

    def _hidden(self):
        pass


if os.name == "posix":
    async def fetch(url, *, timeout=None):
        """Fetch a URL."""
'''


def _fake_stdlib(root):
    files = {
        "zeta.py": MODULE,
        "alpha/__init__.py": '"""Alpha package."""',
        "alpha/beta.py": "x = 1\n",
        "test/test_zeta.py": '"""a test."""',
        "lib2to3/tests/data.py": '"""a test fixture."""',
        "idlelib/idle_test/test_x.py": '"""a test."""',
        "site-packages/pkg.py": '"""installed."""',
        "notes.txt": "not python",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_stdlib_files_skip_tests_site_packages_and_outside_links(tmp_path):
    root = _fake_stdlib(tmp_path / "lib")
    outside = tmp_path / "outside.py"
    outside.write_text('"""elsewhere."""')
    (root / "link.py").symlink_to(outside)
    names = [p.relative_to(root).as_posix() for p in stdlib_files(root)]
    assert names == ["alpha/__init__.py", "alpha/beta.py", "zeta.py"]


def test_prose_is_docstrings_with_qualified_headers(tmp_path):
    root = _fake_stdlib(tmp_path / "lib")
    docs = {d.id: d.text for d in stdlib_prose(root)}
    assert docs["alpha/__init__.py"] == "Module alpha\n\nAlpha package."
    assert docs["alpha/beta.py"] == ""  # no docstring: an empty document, skipped and counted by prepare
    assert docs["zeta.py"] == (
        "Module zeta\n\nTools for widgets.\n\n\n"
        "class zeta.Widget(Base)\n\nA widget.\n\n\n"
        "def zeta.Widget.spin(self, times=1)\n\nSpin ``times`` times.\n\n\n"
        "async def zeta.fetch(url, *, timeout=None)\n\nFetch a URL."
    )


def test_code_is_the_source_text_in_sorted_order(tmp_path):
    root = _fake_stdlib(tmp_path / "lib")
    docs = list(stdlib_code(root))
    assert [d.id for d in docs] == ["alpha/__init__.py", "alpha/beta.py", "zeta.py"]
    assert docs[2].text == MODULE


def test_unparseable_module_gives_empty_prose():
    assert module_docstrings("def broken(:\n", "broken") == ""


def test_real_stdlib_corpus_is_deterministic_and_has_no_tests():
    files = stdlib_files()
    assert files == stdlib_files()
    relative = [p.relative_to(stdlib_dir()).as_posix() for p in files]
    assert relative == sorted(relative)
    assert "json/decoder.py" in relative
    assert not [
        r for r in relative if r.startswith(("test/", "site-packages/")) or "/tests/" in r or "idle_test" in r
    ]
    json_prose = next(d for d in stdlib_prose() if d.id == "json/__init__.py")
    assert json_prose.text.startswith("Module json\n\nJSON (JavaScript Object Notation)")
    assert "def json.dumps(obj, *" in json_prose.text


