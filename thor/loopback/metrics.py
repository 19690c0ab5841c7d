"""Scraping a program's /metrics in tests, as Prometheus does."""

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Samples", "scrape"]


class Samples:
    """The samples of one scrape: value(name, **labels), the sum over samples matching labels."""

    def __init__(self, text):
        self.text = text
        self.samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples]

    def value(self, name, **labels):
        """The sum of name's samples whose labels include labels; None when there is none."""
        found = [
            sample.value
            for sample in self.samples
            if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items())
        ]
        return sum(found) if found else None

    def labels(self, name, label):
        """{label value: sample value} of name's samples."""
        return {sample.labels.get(label): sample.value for sample in self.samples if sample.name == name}


def scrape(address, timeout=5):
    host, port = address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as response:
        return Samples(response.read().decode())
