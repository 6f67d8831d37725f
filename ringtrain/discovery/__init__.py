"""Layer 1, finding peers: mDNS adverts and browsing (`mdns`, the only zeroconf importer).

May import: `ringtrain.errors`, `ringtrain.config`, `ringtrain.comm` (wire, security).
"""
