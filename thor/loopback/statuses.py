"""Network statuses made up for tests, as a manager would publish them."""

from thor.membership.entity import make_entity
from thor.membership.status import merge_presence

__all__ = ["sip_proxy_status_body"]


def sip_proxy_status_body(version, addresses):
    """A Thor.Members body of sip_proxy nodes at these addresses."""
    return {
        "version": version,
        "manager": "manager1",
        "members": {
            f"node{index}": merge_presence([make_entity(f"node{index}", address, ["sip_proxy"], "0.1.0", 0)])
            for index, address in enumerate(addresses)
        },
    }
