import sys

from shmfault.cli import main

sys.exit(main())
