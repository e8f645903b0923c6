"""MQTT: status publisher, Home Assistant discovery, command handler, peer commitments."""
