"""Wire facts and sans-IO codecs shared by every role: no reactor, no transports."""
