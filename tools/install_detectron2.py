#!/usr/bin/env python
"""Install Detectron2 into the running interpreter's environment, idempotently.

Two sources, tried in this order unless ``DW_D2_DETECTRON2`` picks one:

* ``upstream``: Detectron2's git repository, built with its compiled operators. Used when
  the repository is reachable (``git ls-remote`` answers within a few seconds).
* ``snapshot``: the PyPI source distribution ``pb1-detectron2==0.6``, whose Python code is
  upstream Detectron2 at commit 72e9dd6e (2021-10-27) but which ships no C++/CUDA sources.
  We verify its sha256, install its Python package only, and add a ``detectron2._C``
  stand-in that raises a clear error naming the missing operator if anything calls one.
  That snapshot needs Pillow < 10 (``Image.LINEAR``) and setuptools < 81 (``pkg_resources``),
  which are pinned on this path only.

The source that was installed is recorded in ``detectron2/_dw_d2_source.txt`` inside the
installed package, which ``python -m dw_d2.env`` reports.

``--copy-tree SRC --into DEST`` installs nothing: it makes an importable copy of the
Detectron2 source tree SRC (for example a clone of upstream's main branch) in DEST, to be put
ahead of the installed Detectron2 on ``PYTHONPATH``. The copy is Python only, with the same
``detectron2._C`` stand-in, or with ``--compiled`` the tree's own compiled operators, built in
place (needs a C++ compiler; minutes). ``tools/test_upstream.sh`` runs the test suite on it.
"""
import argparse
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

UPSTREAM_URL = "https://github.com/facebookresearch/detectron2.git"
SNAPSHOT_REQUIREMENT = "pb1-detectron2==0.6"
SNAPSHOT_SDIST = "pb1-detectron2-0.6.tar.gz"
SNAPSHOT_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
SNAPSHOT_COMMIT = "72e9dd6e"
# The snapshot's own install_requires, less `black` (only used to pretty-print LazyConfig
# files; its 2021 pin does not install on current Pythons), plus the two pins it needs.
SNAPSHOT_RUNTIME_REQUIREMENTS = [
    "Pillow>=7.1,<10",
    "setuptools<81",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "future",
    "pydot",
    "omegaconf>=2.1",
    "hydra-core>=1.1",
]
SOURCE_MARKER = "_dw_d2_source.txt"
# Changes whenever this script installs the snapshot differently, so that an older install
# is replaced on the next set-up.
SNAPSHOT_MARKER = (f"snapshot ({SNAPSHOT_REQUIREMENT}, upstream commit {SNAPSHOT_COMMIT}, "
                   f"sha256 {SNAPSHOT_SHA256[:12]}..., Python only, NumPy-alias fix)")
# NumPy 1.24 removed the aliases np.int / np.float / np.bool, which the 2021 snapshot still
# uses (for example in the class histogram that build_detection_train_loader prints).
# Upstream Detectron2 replaced them by the builtins in 2022; the snapshot gets the same edit.
NUMPY_ALIAS = re.compile(r"\bnp\.(int|float|bool)\b")

STANDIN_C = '''\
"""Stand-in for Detectron2's compiled extension, written by dw-d2's installer.

This Detectron2 is {origin}, without C++/CUDA operators. dw-d2 needs none of them; anything
that calls one gets this error instead of a crash deep inside Detectron2. The three
build-information functions that Detectron2's ``collect_env_info`` (and so ``default_setup``)
calls answer truthfully.
"""

__dw_d2_standin__ = True


def get_compiler_version():
    return "none (Python-only Detectron2: no compiled operators)"


def get_cuda_version():
    return "none (Python-only Detectron2)"


def has_cuda():
    return False


class MissingCompiledOperator(RuntimeError, AttributeError):
    """Raised when code asks for an operator of Detectron2's compiled extension."""


def __getattr__(name):
    if name.startswith("__") and name.endswith("__"):
        raise AttributeError(name)
    raise MissingCompiledOperator(
        f"detectron2._C.{{name}} is a compiled Detectron2 operator, and this Detectron2 was "
        f"installed without compiled operators ({short_origin}). {remedy}"
    )
'''
SNAPSHOT_STANDIN = dict(
    origin=f"the PyPI source snapshot {SNAPSHOT_REQUIREMENT}, which ships no C++/CUDA sources",
    short_origin=f"PyPI source snapshot {SNAPSHOT_REQUIREMENT}",
    remedy="Install Detectron2 from its git repository to use it "
           "(DW_D2_DETECTRON2=upstream make setup).",
)


def log(msg):
    print(f"[install_detectron2] {msg}", flush=True)


def pip(*args):
    cmd = [sys.executable, "-m", "pip", *args]
    log(" ".join(cmd))
    subprocess.check_call(cmd)


def installed_source():
    spec = importlib.util.find_spec("detectron2")
    if spec is None or not spec.submodule_search_locations:
        return None
    marker = Path(list(spec.submodule_search_locations)[0]) / SOURCE_MARKER
    return marker.read_text().strip() if marker.exists() else "unknown (installed outside dw-d2)"


def upstream_reachable(timeout=15):
    if shutil.which("git") is None:
        return False
    try:
        subprocess.run(
            ["git", "ls-remote", "--exit-code", UPSTREAM_URL, "HEAD"],
            check=True, timeout=timeout, capture_output=True,
            env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
        )
        return True
    except (subprocess.SubprocessError, OSError):
        return False


def install_upstream():
    pip("install", "--no-build-isolation", f"git+{UPSTREAM_URL}")
    spec = importlib.util.find_spec("detectron2")
    pkg_dir = Path(list(spec.submodule_search_locations)[0])
    (pkg_dir / SOURCE_MARKER).write_text(f"upstream ({UPSTREAM_URL})\n")


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_snapshot(cache_dir: Path) -> Path:
    sdist = cache_dir / SNAPSHOT_SDIST
    if not sdist.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        # --no-build-isolation: the sdist's setup.py imports torch to prepare its metadata.
        pip("download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
            "-d", str(cache_dir), SNAPSHOT_REQUIREMENT)
    actual = sha256_of(sdist)
    if actual != SNAPSHOT_SHA256:
        raise SystemExit(
            f"{sdist}: sha256 {actual} does not match the pinned {SNAPSHOT_SHA256}; "
            "refusing to install it. Delete the file to download it again."
        )
    log(f"{sdist.name}: sha256 verified")
    return sdist


def replace_removed_numpy_aliases(package_dir: Path):
    """Apply upstream's 2022 fix for NumPy >= 1.24 to the snapshot; returns the edited files."""
    patched = []
    for path in sorted(package_dir.rglob("*.py")):
        text = path.read_text()
        new_text = NUMPY_ALIAS.sub(lambda m: m.group(1), text)
        if new_text != text:
            path.write_text(new_text)
            patched.append(str(path.relative_to(package_dir.parent)))
    return patched


def write_compiled_ops_standin(package_dir: Path, *, origin: str, short_origin: str, remedy: str):
    """Write ``package_dir/_C.py``, the stand-in for the compiled extension (see STANDIN_C)."""
    (package_dir / "_C.py").write_text(
        STANDIN_C.format(origin=origin, short_origin=short_origin, remedy=remedy))


def copy_python_package(source_root: Path, dest_root: Path) -> Path:
    """Copy the ``detectron2`` package of a source tree (Python files and data, not the C++/CUDA
    sources or build outputs) to ``dest_root/detectron2``; returns that folder."""
    package = dest_root / "detectron2"
    shutil.copytree(source_root / "detectron2", package,
                    ignore=shutil.ignore_patterns("csrc", "__pycache__", "*.so", "*.pyd"))
    return package


def install_snapshot(cache_dir: Path):
    sdist = fetch_snapshot(cache_dir)
    with tempfile.TemporaryDirectory(prefix="d2-snapshot-") as tmp:
        tmp = Path(tmp)
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = tmp / "pb1-detectron2-0.6"
        build = tmp / "build"
        package = copy_python_package(src, build)
        shutil.copy(src / "LICENSE", build / "LICENSE")
        patched = replace_removed_numpy_aliases(package)
        log(f"replaced removed NumPy aliases (np.int -> int, ...) in {len(patched)} files: "
            + ", ".join(patched))
        write_compiled_ops_standin(package, **SNAPSHOT_STANDIN)
        (package / SOURCE_MARKER).write_text(SNAPSHOT_MARKER + "\n")
        (build / "setup.py").write_text(
            "from setuptools import find_packages, setup\n"
            "setup(name='detectron2', version='0.6+snapshot', license='Apache-2.0',\n"
            "      packages=find_packages(include=['detectron2', 'detectron2.*']),\n"
            "      package_data={'detectron2': ['_dw_d2_source.txt']},\n"
            f"      install_requires={SNAPSHOT_RUNTIME_REQUIREMENTS!r})\n")
        pip("install", "--no-build-isolation", str(build))


def tree_commit(source_root: Path) -> str:
    """``commit 02b5c4e2`` (``+ local changes`` when the checkout is modified), or a note
    saying that the tree is not a git checkout."""
    try:
        commit = subprocess.run(["git", "-C", str(source_root), "rev-parse", "--short=8", "HEAD"],
                                check=True, capture_output=True, text=True).stdout.strip()
        changes = subprocess.run(["git", "-C", str(source_root), "status", "--porcelain"],
                                 check=True, capture_output=True, text=True).stdout.strip()
    except (subprocess.SubprocessError, OSError):
        return "commit unknown: not a git checkout"
    return f"commit {commit}" + (" + local changes" if changes else "")


def copy_source_tree(source_root: Path, dest: Path, *, compiled: bool) -> str:
    """Make ``dest`` an importable copy of the Detectron2 source tree ``source_root``
    (``PYTHONPATH=dest``); returns the description recorded in its source marker.

    Python only (the default): the ``detectron2`` package with the ``_C`` stand-in, remade on
    every call (seconds). Compiled: the whole tree, its operators built in place with
    ``setup.py build_ext --inplace``; reused while the marker (tree, commit) is unchanged.
    """
    source_root = source_root.resolve()
    if not (source_root / "detectron2" / "__init__.py").is_file():
        raise SystemExit(f"{source_root}: not a Detectron2 source tree "
                         "(it has no detectron2/__init__.py)")
    commit = tree_commit(source_root)
    kind = ("compiled in place" if compiled
            else "Python only, with dw-d2's detectron2._C stand-in")
    marker = f"source tree {source_root} ({commit}), {kind}"
    marker_file = dest / "detectron2" / SOURCE_MARKER
    if marker_file.is_file():
        if compiled and "local changes" not in commit and "unknown" not in commit \
                and marker_file.read_text().strip() == marker:
            log(f"{dest}: already built from {marker}")
            return marker
        shutil.rmtree(dest)
    elif dest.exists() and any(dest.iterdir()):
        raise SystemExit(f"{dest} exists and is not a copy made by this script; "
                         "refusing to replace it")
    dest.mkdir(parents=True, exist_ok=True)
    if compiled:
        shutil.copytree(source_root, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".git", "build", "__pycache__", "*.so", "*.egg-info"))
        log(f"building Detectron2's compiled operators in {dest} (minutes)")
        subprocess.check_call([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=dest)
        package = dest / "detectron2"
    else:
        package = copy_python_package(source_root, dest)
        write_compiled_ops_standin(
            package, origin=f"a Python-only copy of the source tree {source_root}",
            short_origin="Python-only copy of a source tree",
            remedy="Build the copy with its operators: tools/test_upstream.sh --compiled.")
    # What Detectron2's setup.py does on install, so that detectron2.model_zoo finds its configs.
    zoo_configs = package / "model_zoo" / "configs"
    if (source_root / "configs").is_dir() and not zoo_configs.exists():
        shutil.copytree(source_root / "configs", zoo_configs)
    marker_file.write_text(marker + "\n")
    log(f"{dest}: Detectron2 from {marker}")
    return marker


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", choices=["auto", "upstream", "snapshot"],
                        default=os.environ.get("DW_D2_DETECTRON2", "auto"))
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache") / "detectron2")
    parser.add_argument("--force", action="store_true", help="reinstall even if present")
    parser.add_argument("--copy-tree", type=Path, metavar="SRC",
                        help="install nothing; copy the Detectron2 source tree SRC to --into")
    parser.add_argument("--into", type=Path, metavar="DEST", help="folder of the copy")
    parser.add_argument("--compiled", action="store_true",
                        help="with --copy-tree: build the compiled operators in the copy")
    args = parser.parse_args()
    if args.copy_tree is not None or args.into is not None:
        if args.copy_tree is None or args.into is None:
            parser.error("--copy-tree and --into go together")
        copy_source_tree(args.copy_tree, args.into, compiled=args.compiled)
        return

    current = installed_source()
    if current is not None and not args.force:
        up_to_date = current.startswith("upstream") or current == SNAPSHOT_MARKER
        if up_to_date and (args.source == "auto" or current.startswith(args.source)):
            log(f"Detectron2 already installed: {current}")
            return
    source = args.source
    if source == "auto":
        source = "upstream" if upstream_reachable() else "snapshot"
        if source == "snapshot":
            log("Detectron2's git repository is not reachable: using the PyPI source snapshot")
    if source == "upstream":
        install_upstream()
    else:
        install_snapshot(args.cache_dir)
    importlib.invalidate_caches()
    log(f"installed Detectron2 from: {installed_source()}")


if __name__ == "__main__":
    main()
