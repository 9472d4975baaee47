"""What a service can refuse, with messages fit to show a user."""


class ServiceError(Exception):
    """Base of every error a front door (app, API, CLI) turns into a clear message."""


class PermissionDenied(ServiceError):
    pass


class NotFound(ServiceError):
    pass


class InvalidInput(ServiceError):
    pass


class Conflict(ServiceError):
    pass
