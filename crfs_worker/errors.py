"""Errors crfs reports to users.

Every error that can reach a user is a CrfsError whose message names what is
wrong (the layer, the path, the registry); the CLI prints it without a traceback.
"""


class CrfsError(Exception):
    """Base class: the message is meant for the user."""


class InvalidReferenceError(CrfsError):
    """An image reference or OCI layout name could not be parsed."""


class FormatError(CrfsError):
    """A blob, footer, TOC or manifest is malformed or hostile."""


class VerificationError(CrfsError):
    """Bytes did not match the digest that vouches for them."""


class UnverifiableError(CrfsError):
    """Content carries no digest to check and the user did not allow that."""


class RegistryError(CrfsError):
    """The registry failed or answered something unusable."""


class AuthError(RegistryError):
    """Credentials were missing or refused."""


class NotFoundError(RegistryError):
    """A manifest, blob or path does not exist."""


class RangeNotSupportedError(RegistryError):
    """The registry ignored a Range request (answered 200 with the whole body)."""
