"""The live operator dashboard, an app above the registry: it reads ``nodes`` (its selectors and
live state), never the data path. See docs/architecture.md."""
