// Renders an Ollama Modelfile TEMPLATE the way Ollama does (Go's text/template over .System and .Messages):
// `go run render_go_template.go TEMPLATE_FILE < {"System": ..., "Messages": [{"Role": ..., "Content": ...}]}`.
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

type Values struct {
	System   string
	Messages []Message
}

func main() {
	text, err := os.ReadFile(os.Args[1])
	if err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("modelfile").Parse(string(text)))
	var values Values
	if err := json.NewDecoder(os.Stdin).Decode(&values); err != nil {
		panic(err)
	}
	if err := tmpl.Execute(os.Stdout, values); err != nil {
		panic(err)
	}
}
