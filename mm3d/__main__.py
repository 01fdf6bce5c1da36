import sys

from mm3d.cli import main

sys.exit(main())
