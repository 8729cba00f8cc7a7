"""Keep secrets out of everything we print.

Configuration values are shown as the operator wrote them: a
``${ANCHORE_...}`` placeholder stays a placeholder, a literal secret becomes
``<redacted>`` unless the operator asked to see it.
"""

import copy

from anchore_objmig.config import PLACEHOLDER

REDACTED = "<redacted>"
SECRET_KEYS = {"secret_key", "access_key", "password", "session_token", "token", "secret"}


def is_secret_key(name):
    name = str(name).lower()
    return name in SECRET_KEYS or name.endswith(("_secret", "_password", "_token", "secret_key"))


def redact_section(section, show_secrets=False):
    """A deep copy of a config mapping with literal secrets replaced."""
    section = copy.deepcopy(section)
    if show_secrets:
        return section

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if is_secret_key(key) and isinstance(value, (str, int)) and value != "":
                    if not (isinstance(value, str) and PLACEHOLDER.fullmatch(value.strip())):
                        node[key] = REDACTED
                else:
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(section)
    return section
