"""``python -m vfcore.verse download --target DIR [names]``."""
from vfcore.verse.download import main

raise SystemExit(main())
