"""The one exception type of the data package: every bad input ends in a DataError whose message
names the cause (missing corpus, bad ratio, unknown language, missing tokenizer file, ...).

It is a `t5x_cpt.errors.UserInputError`, so every command reports it as one line and exit status 2
(docs/errors.md)."""

from t5x_cpt.errors import UserInputError


class DataError(UserInputError):
    """Bad data input or configuration; the message names the cause and, where possible, the fix."""
