// A TCP client with one leaking function and its polite twin, for the leak-site
// tests. Waits for a line on stdin, then for each of N rounds: leakyClient dials,
// reads to the server's EOF and keeps the connection (CLOSE_WAIT for good);
// politeClient does the same and closes it. Only leakyClient may be named.
package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"time"
)

var kept []net.Conn

//go:noinline
func leakyClient(addr string) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		panic(err)
	}
	io.Copy(io.Discard, c)
	kept = append(kept, c) // never closed
}

//go:noinline
func politeClient(addr string) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		panic(err)
	}
	io.Copy(io.Discard, c)
	c.Close()
}

func main() {
	n, _ := strconv.Atoi(os.Args[2])
	fmt.Println("ready")
	bufio.NewReader(os.Stdin).ReadString('\n')
	for i := 0; i < n; i++ {
		leakyClient(os.Args[1])
		politeClient(os.Args[1])
	}
	fmt.Println("done", len(kept))
	time.Sleep(time.Hour)
}
