"""What a service can refuse, with messages fit to show a user."""


class ServiceError(Exception):
    """Base of every error a front door (app, API, CLI) turns into a clear message."""


class PermissionDenied(ServiceError):
    pass


class TooManySignIns(PermissionDenied):
    """A sign-in refused because the email failed too often lately, whether or not it has an account."""


class NotFound(ServiceError):
    pass


class InvalidInput(ServiceError):
    pass


class Conflict(ServiceError):
    pass
