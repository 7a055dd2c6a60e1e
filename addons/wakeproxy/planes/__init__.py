"""The control/data split (issue 13): a controller that owns Docker and ACME, serving workers that own
requests, and the channel between them. So far: the channel's wire format (`wire`)."""
