"""``python -m applications.conv_tt_lstm``: the Conv-TT-LSTM command line."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
