"""The service processes the host brokers renderers' requests to: network, storage, compositor."""
