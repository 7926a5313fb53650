"""unetflow: run (and train) a U-Net over microscopy images too big for one GPU."""

__version__ = "0.2.0"
