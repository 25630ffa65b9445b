"""The one exception type of the data package: every bad input ends in a DataError whose message
names the cause (missing corpus, bad ratio, unknown language, missing tokenizer file, ...)."""


class DataError(ValueError):
    """Bad data input or configuration; the message names the cause and, where possible, the fix."""
