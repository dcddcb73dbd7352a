// render_template renders an Ollama TEMPLATE the way Ollama does, for tests/test_parity_go.py.
//
// Usage: go build -o render_template tests/go/render_template.go; render_template < request.json
//
// The request is one JSON document on stdin; the rendered text goes to stdout, byte for byte (no newline added).
//
//	{"template": "...", "data": {"System": "...", "Prompt": "...", "Messages": [{"Role": "...", "Content": "..."}]}}
//	    Execute the template on exactly these values: without Messages, single-turn .System, .Prompt and
//	    .Response (always ""), as Ollama's legacy path does; with Messages, .Messages (structs with Role and
//	    Content), .System and .Response "" as Ollama's Messages path does (no .Prompt there).
//
//	{"template": "...", "messages": [{"role": "...", "content": "..."}], "force_legacy": false}
//	    Do what Ollama's template.(*Template).Execute does with a request's messages (Ollama's chat and generate
//	    handlers both call it with the Modelfile's SYSTEM prepended as a system message): collate the messages
//	    (consecutive same-role messages merged with "\n\n", all system texts joined into .System), then either
//	    execute with .Messages when the template mentions Messages (unless force_legacy), or run the legacy
//	    per-turn .System/.Prompt/.Response loop and cut the final turn's template after {{ .Response }}.
//
// Mirrors github.com/ollama/ollama template/template.go at commit fb30760996871fa9460115c753afd2c60d4ab0f7:
// Parse (missingkey=zero, the same function names, {{ .Response }} appended when the template names neither
// Messages nor Response), Vars/Identifiers, Execute, collate, deleteNode and templateMessage's field names.
// Only the standard library is used (Go 1.19 is enough).
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"text/template"
	"text/template/parse"
	"time"
)

// templateMessage has the field names of Ollama's template.templateMessage (what {{ range .Messages }} sees).
type templateMessage struct {
	Role       string
	Content    string
	Thinking   string
	Images     []string
	ToolCalls  []any
	ToolName   string
	ToolCallID string
}

type request struct {
	Template string `json:"template"`
	Data     *data  `json:"data"`
	Messages []struct {
		Role    string `json:"role"`
		Content string `json:"content"`
	} `json:"messages"`
	ForceLegacy bool `json:"force_legacy"`
}

type data struct {
	System   string `json:"System"`
	Prompt   string `json:"Prompt"`
	Messages []struct {
		Role    string `json:"Role"`
		Content string `json:"Content"`
	} `json:"Messages"`
}

var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
	"currentDate":      func(args ...string) string { return time.Now().Format("2006-01-02") },
	"yesterdayDate":    func(args ...string) string { return time.Now().AddDate(0, 0, -1).Format("2006-01-02") },
	"toTypeScriptType": func(v any) string { return "any" },
}

var responseNode = parse.ActionNode{
	NodeType: parse.NodeAction,
	Pipe: &parse.PipeNode{
		NodeType: parse.NodePipe,
		Cmds: []*parse.CommandNode{{
			NodeType: parse.NodeCommand,
			Args:     []parse.Node{&parse.FieldNode{NodeType: parse.NodeField, Ident: []string{"Response"}}},
		}},
	},
}

func parseTemplate(s string) (*template.Template, []string, error) {
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(s)
	if err != nil {
		return nil, nil, err
	}
	vars, err := templateVars(tmpl)
	if err != nil {
		return nil, nil, err
	}
	if !contains(vars, "messages") && !contains(vars, "response") {
		tmpl.Tree.Root.Nodes = append(tmpl.Tree.Root.Nodes, &responseNode)
	}
	return tmpl, vars, nil
}

func templateVars(tmpl *template.Template) ([]string, error) {
	var vars []string
	for _, tt := range tmpl.Templates() {
		for _, n := range tt.Root.Nodes {
			v, err := identifiers(n)
			if err != nil {
				return vars, err
			}
			vars = append(vars, v...)
		}
	}
	set := map[string]struct{}{}
	for _, n := range vars {
		set[strings.ToLower(n)] = struct{}{}
	}
	out := make([]string, 0, len(set))
	for k := range set {
		out = append(out, k)
	}
	sort.Strings(out)
	return out, nil
}

func identifiers(n parse.Node) ([]string, error) {
	switch n := n.(type) {
	case *parse.ListNode:
		var names []string
		for _, c := range n.Nodes {
			i, err := identifiers(c)
			if err != nil {
				return names, err
			}
			names = append(names, i...)
		}
		return names, nil
	case *parse.TemplateNode:
		if n.Pipe == nil {
			return nil, errors.New("undefined template specified")
		}
		return identifiers(n.Pipe)
	case *parse.ActionNode:
		if n.Pipe == nil {
			return nil, errors.New("undefined action in template")
		}
		return identifiers(n.Pipe)
	case *parse.BranchNode:
		if n.Pipe == nil {
			return nil, errors.New("undefined branch")
		}
		names, err := identifiers(n.Pipe)
		if err != nil {
			return names, err
		}
		for _, l := range []*parse.ListNode{n.List, n.ElseList} {
			if l != nil {
				i, err := identifiers(l)
				if err != nil {
					return names, err
				}
				names = append(names, i...)
			}
		}
		return names, nil
	case *parse.IfNode:
		return identifiers(&n.BranchNode)
	case *parse.RangeNode:
		return identifiers(&n.BranchNode)
	case *parse.WithNode:
		return identifiers(&n.BranchNode)
	case *parse.PipeNode:
		var names []string
		for _, c := range n.Cmds {
			for _, a := range c.Args {
				i, err := identifiers(a)
				if err != nil {
					return names, err
				}
				names = append(names, i...)
			}
		}
		return names, nil
	case *parse.FieldNode:
		return n.Ident, nil
	case *parse.VariableNode:
		return n.Ident, nil
	}
	return nil, nil
}

func deleteNode(n parse.Node, fn func(parse.Node) bool) parse.Node {
	var walk func(n parse.Node) parse.Node
	walk = func(n parse.Node) parse.Node {
		if fn(n) {
			return nil
		}
		switch t := n.(type) {
		case *parse.ListNode:
			var nodes []parse.Node
			for _, c := range t.Nodes {
				if n := walk(c); n != nil {
					nodes = append(nodes, n)
				}
			}
			t.Nodes = nodes
			return t
		case *parse.IfNode:
			t.BranchNode = *walk(&t.BranchNode).(*parse.BranchNode)
		case *parse.WithNode:
			t.BranchNode = *walk(&t.BranchNode).(*parse.BranchNode)
		case *parse.RangeNode:
			t.BranchNode = *walk(&t.BranchNode).(*parse.BranchNode)
		case *parse.BranchNode:
			t.List = walk(t.List).(*parse.ListNode)
			if t.ElseList != nil {
				t.ElseList = walk(t.ElseList).(*parse.ListNode)
			}
		case *parse.ActionNode:
			n := walk(t.Pipe)
			if n == nil {
				return nil
			}
			t.Pipe = n.(*parse.PipeNode)
		case *parse.PipeNode:
			var commands []*parse.CommandNode
			for _, c := range t.Cmds {
				var args []parse.Node
				for _, a := range c.Args {
					if n := walk(a); n != nil {
						args = append(args, n)
					}
				}
				if len(args) == 0 {
					return nil
				}
				c.Args = args
				commands = append(commands, c)
			}
			if len(commands) == 0 {
				return nil
			}
			t.Cmds = commands
		}
		return n
	}
	return walk(n)
}

func contains(xs []string, s string) bool {
	for _, x := range xs {
		if x == s {
			return true
		}
	}
	return false
}

// messagesValues / legacyValues: the exact maps Ollama's Execute passes (a key it leaves out renders as the
// zero value under missingkey=zero, e.g. .Prompt in the Messages path prints "<no value>", as in Ollama).
func messagesValues(system string, messages []*templateMessage) map[string]any {
	return map[string]any{
		"System":     system,
		"Messages":   messages,
		"Tools":      []any(nil),
		"Response":   "",
		"Think":      false,
		"ThinkLevel": "",
		"IsThinkSet": false,
	}
}

func legacyValues(system, prompt, response string) map[string]any {
	return map[string]any{
		"System":     system,
		"Prompt":     prompt,
		"Response":   response,
		"Think":      false,
		"ThinkLevel": "",
		"IsThinkSet": false,
	}
}

type message struct{ Role, Content string }

// collate: Ollama's collate (system texts joined with "\n\n"; consecutive same-role messages merged).
func collate(msgs []message) (string, []*message) {
	var system []string
	var collated []*message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			collated[len(collated)-1].Content += "\n\n" + msgs[i].Content
		} else {
			collated = append(collated, &msgs[i])
		}
	}
	return strings.Join(system, "\n\n"), collated
}

// execute: Ollama's (*Template).Execute for a request without Suffix.
func execute(w io.Writer, tmpl *template.Template, vars []string, msgs []message, forceLegacy bool) error {
	system, messages := collate(msgs)
	if !forceLegacy && contains(vars, "messages") {
		tm := make([]*templateMessage, len(messages))
		for i, m := range messages {
			tm[i] = &templateMessage{Role: m.Role, Content: m.Content}
		}
		return tmpl.Execute(w, messagesValues(system, tm))
	}

	system = ""
	var b bytes.Buffer
	var prompt, response string
	for _, m := range messages {
		run := func() error {
			if err := tmpl.Execute(&b, legacyValues(system, prompt, response)); err != nil {
				return err
			}
			system, prompt, response = "", "", ""
			return nil
		}
		switch m.Role {
		case "system":
			if prompt != "" || response != "" {
				if err := run(); err != nil {
					return err
				}
			}
			system = m.Content
		case "user":
			if response != "" {
				if err := run(); err != nil {
					return err
				}
			}
			prompt = m.Content
		case "assistant":
			response = m.Content
		}
	}

	var cut bool
	nodes := deleteNode(tmpl.Root.Copy(), func(n parse.Node) bool {
		if field, ok := n.(*parse.FieldNode); ok && contains(field.Ident, "Response") {
			cut = true
			return false
		}
		return cut
	})
	tree := parse.Tree{Root: nodes.(*parse.ListNode)}
	last := template.Must(template.New("").AddParseTree("", &tree))
	if err := last.Execute(&b, legacyValues(system, prompt, response)); err != nil {
		return err
	}
	_, err := io.Copy(w, &b)
	return err
}

func run() error {
	var req request
	dec := json.NewDecoder(os.Stdin)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		return fmt.Errorf("reading the request: %w", err)
	}
	tmpl, vars, err := parseTemplate(req.Template)
	if err != nil {
		return fmt.Errorf("parsing the template: %w", err)
	}
	var out bytes.Buffer
	switch {
	case req.Data != nil && req.Messages != nil:
		return errors.New("give either data or messages, not both")
	case req.Data != nil:
		if req.Data.Messages != nil {
			tm := make([]*templateMessage, len(req.Data.Messages))
			for i, m := range req.Data.Messages {
				tm[i] = &templateMessage{Role: m.Role, Content: m.Content}
			}
			err = tmpl.Execute(&out, messagesValues(req.Data.System, tm))
		} else {
			err = tmpl.Execute(&out, legacyValues(req.Data.System, req.Data.Prompt, ""))
		}
	default:
		msgs := make([]message, len(req.Messages))
		for i, m := range req.Messages {
			msgs[i] = message{Role: m.Role, Content: m.Content}
		}
		err = execute(&out, tmpl, vars, msgs, req.ForceLegacy)
	}
	if err != nil {
		return fmt.Errorf("executing the template: %w", err)
	}
	_, err = os.Stdout.Write(out.Bytes())
	return err
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "render_template:", err)
		os.Exit(1)
	}
}
