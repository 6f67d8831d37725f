"""Layers 0-1, finding peers: adverts (`advert`, pure), candidates (`candidates`, pure), this
host's interfaces (`interfaces`, ifaddr), mDNS announcing and browsing (`mdns`) and a unicast
query of one responder (`mdns_unicast`), the only zeroconf importers; DNS records (`dns`).

May import: `ringtrain.errors`, `ringtrain.config`, `ringtrain.comm` (wire, security).
"""
