"""`python -m processor`: one processor worker (see processor.app.main)."""

from __future__ import annotations

from processor.app import main

if __name__ == "__main__":
    main()
