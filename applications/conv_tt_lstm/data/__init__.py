"""Dataset pipelines of the Conv-TT-LSTM application (one module per dataset or format)."""
