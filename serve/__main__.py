"""`python -m serve --model DIR`: the streaming encoder service (see serve.cli)."""
import sys

from serve.cli import main

sys.exit(main())
