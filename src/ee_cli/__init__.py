"""ee: on-device personalisation of image classifiers with early exits."""

__version__ = "0.1.0"
