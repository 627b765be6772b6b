"""Print what dw-d2 runs on: ``python -m dw_d2.env``."""
import argparse
import importlib.util
import platform
import sys
from pathlib import Path


def detectron2_source():
    """Where the installed Detectron2 came from, as recorded by tools/install_detectron2.py."""
    spec = importlib.util.find_spec("detectron2")
    if spec is None:
        return None
    marker = Path(list(spec.submodule_search_locations)[0]) / "_dw_d2_source.txt"
    if marker.exists():
        return marker.read_text().strip()
    return "unknown (installed outside dw-d2's set-up)"


def has_compiled_ops():
    """True when Detectron2's compiled extension is real (not dw-d2's snapshot stand-in)."""
    try:
        from detectron2 import _C
    except ImportError:
        return False
    return not getattr(_C, "__dw_d2_standin__", False)


def collect():
    import torch
    import torchvision

    rows = [
        ("Python", sys.version.split()[0] + f" ({platform.machine()})"),
        ("torch", torch.__version__),
        ("torchvision", torchvision.__version__),
    ]
    try:
        import detectron2

        rows.append(("Detectron2", f"{detectron2.__version__} from {detectron2_source()}"))
        rows.append(("Detectron2 compiled ops", "yes" if has_compiled_ops() else
                     "no (COCO evaluation uses the official pycocotools path)"))
    except ImportError as e:
        rows.append(("Detectron2", f"not importable: {e}"))
    cuda = torch.cuda.is_available()
    rows.append(("CUDA available", f"yes ({torch.cuda.get_device_name(0)})" if cuda else "no"))
    rows.append(("CUDA build of torch", torch.version.cuda or "no (CPU build)"))
    import dw_d2

    rows.append(("dw_d2", f"{dw_d2.__version__} at {Path(dw_d2.__file__).parent}"))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--short", action="store_true", help="one line per item, no header")
    args = parser.parse_args(argv)
    rows = collect()
    width = max(len(k) for k, _ in rows)
    if not args.short:
        print("dw-d2 environment")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


if __name__ == "__main__":
    main()
