"""Edge side: the daemon that runs the head, encodes the cut tensor and sends it to the server."""
