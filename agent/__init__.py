from importlib import metadata as _metadata


def distribution_version() -> str:
    """This mqtt-fleet's version, for --version and the device facts (one place)."""
    try:
        return _metadata.version("mqtt-fleet")
    except _metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"
