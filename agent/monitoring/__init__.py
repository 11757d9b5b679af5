"""Monitoring: measurements -> windows -> drift -> alarms -> payloads.

Fixed-bin windows on the audio clock, drift scores and alarm rules, the stats payloads and the
privacy rules that decide what may leave the device, and the review samples that never do.
"""
