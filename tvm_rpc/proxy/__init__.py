"""C{twistd rpc-proxy}: pairs clients and servers by key and relays their bytes.

L{pairing} is the pure pairing state machine, L{relay} the backpressured
byte relay, L{protocol} the connection adapter, L{registration} the tracker
registration of the servers behind the proxy, L{web} the websocket endpoint
and L{tap} the command line.
"""
