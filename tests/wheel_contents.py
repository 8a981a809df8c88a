"""Run by ``make wheel-check`` with the wheel's interpreter, outside the repository: the installed wheel put only
``popstack`` (and its dist-info) into site-packages, and ``popstack`` imports from there with its configs."""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path


def main() -> int:
    site = Path(sysconfig.get_paths()["purelib"])
    extra = sorted(p.name for p in site.iterdir()
                   if p.name not in ("popstack", "__pycache__", "project-deps.pth")
                   and not (p.name.startswith("popstack-") and p.name.endswith(".dist-info")))
    if extra:
        print(f"the wheel installed more than popstack: {extra}", file=sys.stderr)
        return 1
    import popstack
    import popstack.pipeline.config as config
    from popstack.lightning_modules.backbone import MODEL_CONFIG_DIR

    for path in (Path(popstack.__file__), config.CONFIG_DIR / "train.yaml", MODEL_CONFIG_DIR):
        if site not in path.resolve().parents:
            print(f"{path} is not inside {site}", file=sys.stderr)
            return 1
    print("wheel contents ok: only popstack in", site)
    return 0


if __name__ == "__main__":
    sys.exit(main())
