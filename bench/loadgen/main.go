// Command loadgen drives POST /v1/events over mutual TLS as a fleet of agents would.
//
// Each agent has its own client certificate and its own keep-alive connection;
// each worker owns a fixed share of the agents and sends for them in turn, so an
// agent's sequence numbers rise in the order its requests arrive. Event ids are
// unique per run (run id, agent index, sequence). The standard library only, so
// it builds offline. The configuration is a JSON file named by the only argument;
// the result is one JSON object on stdout.
package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

type agentConfig struct {
	Cert string `json:"cert"`
	Key  string `json:"key"`
}

type config struct {
	URL       string        `json:"url"`
	RootCA    string        `json:"root_ca"`
	Agents    []agentConfig `json:"agents"`
	Events    []string      `json:"events"` // JSON objects with @ID@ and @SEQ@ placeholders
	RunID     string        `json:"run_id"`
	DurationS float64       `json:"duration_s"`
	Workers   int           `json:"workers"`
}

type result struct {
	Requests       int64            `json:"requests"`
	Accepted       int64            `json:"accepted_requests"`
	AcceptedEvents int64            `json:"accepted_events"`
	WarmupEvents   int64            `json:"warmup_events"`
	StatusCodes    map[string]int64 `json:"status_codes"`
	Errors         map[string]int64 `json:"errors"`
	ElapsedS       float64          `json:"elapsed_s"`
	RPS            float64          `json:"rps"`
	EventsPerS     float64          `json:"events_per_s"`
	P50Ms          float64          `json:"p50_ms"`
	P99Ms          float64          `json:"p99_ms"`
	CPUS           float64          `json:"cpu_s"`
}

type agent struct {
	index  int
	client *http.Client
	seq    int64
}

type workerStats struct {
	latencies []time.Duration
	codes     map[string]int64
	errors    map[string]int64
	accepted  int64
	events    int64
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: loadgen <config.json>")
		os.Exit(2)
	}
	raw, err := os.ReadFile(os.Args[1])
	check(err)
	var cfg config
	check(json.Unmarshal(raw, &cfg))
	roots := x509.NewCertPool()
	pem, err := os.ReadFile(cfg.RootCA)
	check(err)
	if !roots.AppendCertsFromPEM(pem) {
		check(fmt.Errorf("no certificate in %s", cfg.RootCA))
	}
	agents := make([]*agent, len(cfg.Agents))
	for i, a := range cfg.Agents {
		pair, err := tls.LoadX509KeyPair(a.Cert, a.Key)
		check(err)
		transport := &http.Transport{
			TLSClientConfig:     &tls.Config{RootCAs: roots, Certificates: []tls.Certificate{pair}},
			MaxIdleConnsPerHost: 1,
			MaxConnsPerHost:     1,
			IdleConnTimeout:     time.Minute,
			DisableCompression:  true,
		}
		agents[i] = &agent{index: i, client: &http.Client{Transport: transport, Timeout: 10 * time.Second}}
	}
	workers := cfg.Workers
	if workers > len(agents) {
		workers = len(agents)
	}
	owned := make([][]*agent, workers)
	for i, a := range agents {
		owned[i%workers] = append(owned[i%workers], a)
	}
	stats := make([]*workerStats, workers)
	var warmup int64
	var warm sync.WaitGroup
	// Warm-up: one request per agent (TLS handshake, the edge's certificate check),
	// counted as accepted events but not timed.
	for w := 0; w < workers; w++ {
		stats[w] = &workerStats{codes: map[string]int64{}, errors: map[string]int64{}}
		warm.Add(1)
		go func(w int) {
			defer warm.Done()
			for _, a := range owned[w] {
				status, n, _ := send(&cfg, a)
				if status == 202 {
					atomic.AddInt64(&warmup, int64(n))
				}
			}
		}(w)
	}
	warm.Wait()
	var before syscall.Rusage
	check(syscall.Getrusage(syscall.RUSAGE_SELF, &before))
	start := time.Now()
	deadline := start.Add(time.Duration(cfg.DurationS * float64(time.Second)))
	var done sync.WaitGroup
	for w := 0; w < workers; w++ {
		done.Add(1)
		go func(s *workerStats, mine []*agent) {
			defer done.Done()
			for i := 0; time.Now().Before(deadline); i++ {
				a := mine[i%len(mine)]
				began := time.Now()
				status, n, err := send(&cfg, a)
				s.latencies = append(s.latencies, time.Since(began))
				if err != nil {
					s.errors[errorKind(err)]++
					continue
				}
				s.codes[strconv.Itoa(status)]++
				if status == 202 {
					s.accepted++
					s.events += int64(n)
				}
			}
		}(stats[w], owned[w])
	}
	done.Wait()
	elapsed := time.Since(start).Seconds()
	var after syscall.Rusage
	check(syscall.Getrusage(syscall.RUSAGE_SELF, &after))
	out := result{StatusCodes: map[string]int64{}, Errors: map[string]int64{}, ElapsedS: elapsed, WarmupEvents: warmup}
	var all []time.Duration
	for _, s := range stats {
		all = append(all, s.latencies...)
		for k, v := range s.codes {
			out.StatusCodes[k] += v
		}
		for k, v := range s.errors {
			out.Errors[k] += v
		}
		out.Accepted += s.accepted
		out.AcceptedEvents += s.events
	}
	out.Requests = int64(len(all))
	out.RPS = float64(out.Accepted) / elapsed
	out.EventsPerS = float64(out.AcceptedEvents) / elapsed
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	out.P50Ms = quantileMs(all, 0.50)
	out.P99Ms = quantileMs(all, 0.99)
	out.CPUS = cpu(after) - cpu(before)
	check(json.NewEncoder(os.Stdout).Encode(out))
}

// send posts one batch for the agent; returns the status and the number of events sent.
func send(cfg *config, a *agent) (int, int, error) {
	var body bytes.Buffer
	body.WriteString(`{"events":[`)
	for i, event := range cfg.Events {
		a.seq++
		id := cfg.RunID + "-" + strconv.Itoa(a.index) + "-" + strconv.FormatInt(a.seq, 10)
		if i > 0 {
			body.WriteByte(',')
		}
		body.WriteString(strings.NewReplacer("@ID@", id, "@SEQ@", strconv.FormatInt(a.seq, 10)).Replace(event))
	}
	body.WriteString(`]}`)
	request, err := http.NewRequest("POST", cfg.URL, &body)
	if err != nil {
		return 0, 0, err
	}
	request.Header.Set("Content-Type", "application/json")
	response, err := a.client.Do(request)
	if err != nil {
		return 0, 0, err
	}
	// Read to the end so the connection is kept alive.
	_, _ = io.Copy(io.Discard, response.Body)
	response.Body.Close()
	return response.StatusCode, len(cfg.Events), nil
}

func errorKind(err error) string {
	text := err.Error()
	if len(text) > 80 {
		text = text[:80]
	}
	return text
}

func quantileMs(sorted []time.Duration, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	index := int(q * float64(len(sorted)-1))
	return float64(sorted[index].Microseconds()) / 1000
}

func cpu(r syscall.Rusage) float64 {
	return float64(r.Utime.Sec+r.Stime.Sec) + float64(r.Utime.Usec+r.Stime.Usec)/1e6
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadgen:", err)
		os.Exit(1)
	}
}
