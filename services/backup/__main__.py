import sys

from services.backup.cli import main

sys.exit(main())
