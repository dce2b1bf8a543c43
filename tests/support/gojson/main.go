// A reader of JSON-RPC and model-API bodies as Go services read them: encoding/json into structs, which matches
// object keys to fields exactly first and then case-insensitively (with Unicode simple folding: U+017F is s,
// U+212A is k). The tests compare what it binds with what the PEP put in the policy input.
//
//	gojson decode mcp|openai|answer   stdin: a JSON array of base64 bodies (answer: chat completions as an agent's
//	                           client reads them); stdout: a JSON array of what each bound
//	gojson serve               an MCP-like upstream on 127.0.0.1 (port on stdout): POST runs tools/call by the
//	                           name it bound, GET /calls lists the names run; it exits when stdin closes
//	gojson fold                stdout: every fold orbit of Unicode, as arrays of code points
//
// Standard library only, so `go build` needs no module download.
package main

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"unicode"
)

// Params holds the fields an MCP server reads from params. Pointers tell an absent key from an empty one.
type Params struct {
	Name            *string         `json:"name,omitempty"`
	URI             *string         `json:"uri,omitempty"`
	Arguments       json.RawMessage `json:"arguments,omitempty"`
	Meta            json.RawMessage `json:"_meta,omitempty"`
	ProtocolVersion *string         `json:"protocolVersion,omitempty"`
}

// Message is one JSON-RPC 2.0 message as a Go MCP server binds it.
type Message struct {
	JSONRPC *string          `json:"jsonrpc,omitempty"`
	ID      *json.RawMessage `json:"id,omitempty"`
	Method  *string          `json:"method,omitempty"`
	Params  *Params          `json:"params,omitempty"`
	Result  json.RawMessage  `json:"result,omitempty"`
	Error   json.RawMessage  `json:"error,omitempty"`
}

// Typed tool arguments, as a tool handler with an input struct binds them.
type ToolInput struct {
	To    string `json:"to"`
	Path  string `json:"path"`
	Query string `json:"query"`
	Key   string `json:"key"`
}

// Bound is what the reader reports about one message: the struct re-encoded with its canonical keys, the
// arguments as a map (keys kept as sent) and as the typed input.
type Bound struct {
	Message   Message                `json:"message"`
	Arguments map[string]interface{} `json:"arguments"`
	Typed     *ToolInput             `json:"typed"`
}

type Function struct {
	Name *string `json:"name,omitempty"`
}

type Tool struct {
	Type     *string   `json:"type,omitempty"`
	Name     *string   `json:"name,omitempty"`
	Function *Function `json:"function,omitempty"`
}

// ChatRequest holds what an OpenAI-compatible Go server (Ollama, for one) reads from a model call.
type ChatRequest struct {
	Model     *string     `json:"model,omitempty"`
	Stream    *bool       `json:"stream,omitempty"`
	Tools     []Tool      `json:"tools,omitempty"`
	Functions []*Function `json:"functions,omitempty"`
}

// ChatAnswer holds what a Go agent's OpenAI client (go-openai, for one) binds from a chat completion or one
// stream chunk: each choice's tool calls (message or delta) and the legacy function call.
type ChatAnswer struct {
	Model   *string `json:"model,omitempty"`
	Choices []struct {
		Message *AnswerMessage `json:"message,omitempty"`
		Delta   *AnswerMessage `json:"delta,omitempty"`
	} `json:"choices,omitempty"`
}

type AnswerMessage struct {
	ToolCalls []struct {
		Type     *string   `json:"type,omitempty"`
		Function *Function `json:"function,omitempty"`
	} `json:"tool_calls,omitempty"`
	FunctionCall *Function `json:"function_call,omitempty"`
}

type Result struct {
	OK       bool         `json:"ok"`
	Error    string       `json:"error,omitempty"`
	Batch    bool         `json:"batch"`
	Messages []Bound      `json:"messages,omitempty"`
	Chat     *ChatRequest `json:"chat,omitempty"`
	Answer   *ChatAnswer  `json:"answer,omitempty"`
}

func bind(m Message) (Bound, error) {
	b := Bound{Message: m}
	if m.Params != nil && len(m.Params.Arguments) > 0 && string(m.Params.Arguments) != "null" {
		if err := json.Unmarshal(m.Params.Arguments, &b.Arguments); err != nil {
			return b, err
		}
		var typed ToolInput
		if err := json.Unmarshal(m.Params.Arguments, &typed); err != nil {
			return b, err
		}
		b.Typed = &typed
	}
	return b, nil
}

func decodeMCP(body []byte) Result {
	var r Result
	var messages []Message
	if t := bytes.TrimLeft(body, " \t\r\n"); len(t) > 0 && t[0] == '[' {
		r.Batch = true
		if err := json.Unmarshal(body, &messages); err != nil {
			r.Error = err.Error()
			return r
		}
	} else {
		var m Message
		if err := json.Unmarshal(body, &m); err != nil {
			r.Error = err.Error()
			return r
		}
		messages = []Message{m}
	}
	for _, m := range messages {
		b, err := bind(m)
		if err != nil {
			r.Error = err.Error()
			return r
		}
		r.Messages = append(r.Messages, b)
	}
	r.OK = true
	return r
}

func decodeOpenAI(body []byte) Result {
	var r Result
	var chat ChatRequest
	if err := json.Unmarshal(body, &chat); err != nil {
		r.Error = err.Error()
		return r
	}
	r.OK = true
	r.Chat = &chat
	return r
}

func decode(mode string) error {
	var bodies []string
	if err := json.NewDecoder(os.Stdin).Decode(&bodies); err != nil {
		return err
	}
	results := make([]Result, 0, len(bodies))
	for _, text := range bodies {
		body, err := base64.StdEncoding.DecodeString(text)
		if err != nil {
			return err
		}
		if mode == "openai" {
			results = append(results, decodeOpenAI(body))
		} else if mode == "answer" {
			var r Result
			var answer ChatAnswer
			if err := json.Unmarshal(body, &answer); err != nil {
				r.Error = err.Error()
			} else {
				r.OK, r.Answer = true, &answer
			}
			results = append(results, r)
		} else {
			results = append(results, decodeMCP(body))
		}
	}
	return json.NewEncoder(os.Stdout).Encode(results)
}

// fold prints each set of runes that Unicode simple folding makes equal (what encoding/json folds).
func fold() error {
	var orbits [][]rune
	for r := rune(0); r <= unicode.MaxRune; r++ {
		next := unicode.SimpleFold(r)
		if next == r || next < r {
			continue // no orbit, or not its smallest member
		}
		smallest := true
		orbit := []rune{r}
		for o := next; o != r; o = unicode.SimpleFold(o) {
			if o < r {
				smallest = false
			}
			orbit = append(orbit, o)
		}
		if smallest {
			orbits = append(orbits, orbit)
		}
	}
	return json.NewEncoder(os.Stdout).Encode(orbits)
}

type upstream struct {
	mu    sync.Mutex
	calls []string
}

func (u *upstream) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	if r.Method == http.MethodGet && r.URL.Path == "/calls" {
		u.mu.Lock()
		defer u.mu.Unlock()
		json.NewEncoder(w).Encode(append([]string{}, u.calls...))
		return
	}
	body, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	var m Message
	if err := json.Unmarshal(body, &m); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	text := "ok"
	if m.Method != nil && *m.Method == "tools/call" && m.Params != nil && m.Params.Name != nil {
		u.mu.Lock()
		u.calls = append(u.calls, *m.Params.Name)
		u.mu.Unlock()
		text = "ran " + *m.Params.Name
	}
	id := json.RawMessage("null")
	if m.ID != nil {
		id = *m.ID
	}
	json.NewEncoder(w).Encode(map[string]interface{}{
		"jsonrpc": "2.0",
		"id":      id,
		"result":  map[string]interface{}{"content": []map[string]string{{"type": "text", "text": text}}},
	})
}

func serve() error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	fmt.Printf("http://%s\n", ln.Addr().String())
	go func() {
		io.Copy(io.Discard, os.Stdin) // the parent closed our stdin (or went away): stop
		os.Exit(0)
	}()
	return http.Serve(ln, &upstream{})
}

func main() {
	var err error
	switch {
	case len(os.Args) == 3 && os.Args[1] == "decode":
		err = decode(os.Args[2])
	case len(os.Args) == 2 && os.Args[1] == "serve":
		err = serve()
	case len(os.Args) == 2 && os.Args[1] == "fold":
		err = fold()
	default:
		err = fmt.Errorf("usage: gojson decode mcp|openai|answer | gojson serve | gojson fold")
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
