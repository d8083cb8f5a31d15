// Benchmark driver for bench/fd.ts (FD_BENCH_GO): Virtlet's own FDServer and FDClient (pkg/tapmanager/fdserver.go
// of a Virtlet checkout, copied into a scratch build dir by build.sh, never into this repository) behind the same
// command line as tapmanager's fd_floor example, so bench/fd.ts runs it as a third client and server:
//
//	virtlet-fd-bench server <socket>        serves until killed; keys g1/g4 hold 1/4 fds of /dev/null; prints "ready"
//	virtlet-fd-bench client <socket> <get|addrel> <concurrency> <ops> <nfds>   prints one JSON line of figures
//
// Virtlet's client opens a new connection per request, so there is no keep-alive mode.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"sort"
	"strconv"
	"sync"
	"syscall"
	"time"

	"virtletbench/tapmanager"
)

type src struct {
	mu  sync.Mutex
	fds map[string][]int
}

func devnull(n int) []int {
	fds := make([]int, n)
	for i := range fds {
		fd, err := syscall.Open("/dev/null", syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
		if err != nil {
			panic(err)
		}
		fds[i] = fd
	}
	return fds
}

func (s *src) GetFDs(key string, data []byte) ([]int, []byte, error) {
	n := 1
	if key == "g4" {
		n = 4
	}
	fds := devnull(n)
	s.mu.Lock()
	s.fds[key] = fds
	s.mu.Unlock()
	return fds, nil, nil
}
func (s *src) Release(key string) error {
	s.mu.Lock()
	fds := s.fds[key]
	delete(s.fds, key)
	s.mu.Unlock()
	for _, fd := range fds {
		syscall.Close(fd)
	}
	return nil
}
func (s *src) GetInfo(key string) ([]byte, error)    { return nil, nil }
func (s *src) Recover(key string, data []byte) error { return nil }
func (s *src) RetrieveFDs(key string) ([]int, error) { return nil, nil }
func (s *src) Stop() error                           { return nil }

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: gobench server <sock> | client <sock> <get|addrel> <conc> <ops> <nfds>")
		os.Exit(2)
	}
	sock := os.Args[2]
	switch os.Args[1] {
	case "server":
		s := tapmanager.NewFDServer(sock, &src{fds: map[string][]int{}})
		if err := s.Serve(); err != nil {
			panic(err)
		}
		c := tapmanager.NewFDClient(sock)
		for _, k := range []string{"g1", "g4"} {
			if _, err := c.AddFDs(k, struct{}{}); err != nil {
				panic(err)
			}
		}
		fmt.Println("ready")
		select {}
	case "client":
		mode := os.Args[3]
		conc, _ := strconv.Atoi(os.Args[4])
		ops, _ := strconv.Atoi(os.Args[5])
		nfds := os.Args[6]
		c := tapmanager.NewFDClient(sock)
		var mu sync.Mutex
		lat := make([]float64, 0, ops)
		var wg sync.WaitGroup
		start := time.Now()
		for w := 0; w < conc; w++ {
			wg.Add(1)
			go func(w int) {
				defer wg.Done()
				mine := make([]float64, 0, ops/conc)
				for i := 0; i < ops/conc; i++ {
					t0 := time.Now()
					if mode == "get" {
						fds, _, err := c.GetFDs("g" + nfds)
						if err != nil {
							panic(err)
						}
						for _, fd := range fds {
							syscall.Close(fd)
						}
					} else {
						k := fmt.Sprintf("a%d-%d", w, i)
						if _, err := c.AddFDs(k, struct{}{}); err != nil {
							panic(err)
						}
						if err := c.ReleaseFDs(k); err != nil {
							panic(err)
						}
					}
					mine = append(mine, float64(time.Since(t0).Nanoseconds())/1e3)
				}
				mu.Lock()
				lat = append(lat, mine...)
				mu.Unlock()
			}(w)
		}
		wg.Wait()
		secs := time.Since(start).Seconds()
		sort.Float64s(lat)
		pct := func(p float64) float64 {
			i := int(float64(len(lat)) * p)
			if i >= len(lat) {
				i = len(lat) - 1
			}
			return lat[i]
		}
		out, _ := json.Marshal(map[string]float64{"ops": float64(len(lat)), "secs": secs, "p50_us": pct(0.5), "p99_us": pct(0.99)})
		fmt.Println(string(out))
	}
}
