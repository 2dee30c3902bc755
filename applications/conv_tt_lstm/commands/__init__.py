"""One module per subcommand of ``python -m applications.conv_tt_lstm`` (see ``cli.py``)."""
