"""A TCP client with one leaking function and its polite twin, for the leak-site tests
(the Python twin of sites_client.go). Waits for a line on stdin, then for each of N
rounds: leaky_client connects, reads to the server's EOF and keeps the socket;
polite_client does the same and closes it."""
import socket
import sys
import time

kept = []


def leaky_client(addr):
    s = socket.create_connection(addr)
    while s.recv(512):
        pass
    kept.append(s)  # never closed


def polite_client(addr):
    s = socket.create_connection(addr)
    while s.recv(512):
        pass
    s.close()


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    addr = (host, int(port))
    print("ready", flush=True)
    sys.stdin.readline()
    for _ in range(int(sys.argv[2])):
        leaky_client(addr)
        polite_client(addr)
    print("done", len(kept), flush=True)
    time.sleep(3600)


main()
