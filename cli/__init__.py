"""The `fleet` command line: the operator's client of the controller's REST API."""
