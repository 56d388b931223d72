import sys

from authsvc.cli import main

sys.exit(main())
