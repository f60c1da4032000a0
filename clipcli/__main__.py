"""``python -m clipcli``."""

from clipcli.cli import main

if __name__ == "__main__":
    main()
