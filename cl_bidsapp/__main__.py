"""Allow ``python -m cl_bidsapp``."""
from cl_bidsapp.cli.run import main

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
