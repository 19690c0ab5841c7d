"""Configuration of thor-manager: the [Manager] section."""

from thor.config import Section, Setting
from thor.datatypes import Float


class ManagerConfig(Section):
    name = "Manager"
    status_interval = Setting(
        Float(0.5, 3600), "5", "Seconds between the active manager's word on which network status version is current."
    )
    coalesce = Setting(
        Float(0, 5),
        "0.05",
        "Seconds to gather changes into one network status before publishing it.",
    )
