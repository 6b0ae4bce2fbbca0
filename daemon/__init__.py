"""Processes and the network: the DICOM receiver, the service that runs it, and the admin CLI."""
