// jwtgen prints, as one JSON object, a throwaway decentralised-auth setup for
// a nats-server in operator mode (resolver: MEMORY): an operator, a system
// account, an account with one user, the user's credentials file, and the
// credentials of a user whose account the server does not know.
//
// Used by tests/nats_options.rs: go run ./tests/go/jwtgen
package main

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nkeys"
)

type setup struct {
	OperatorJWT     string            `json:"operator_jwt"`
	SystemAccount   string            `json:"system_account"`
	Account         string            `json:"account"`
	ResolverPreload map[string]string `json:"resolver_preload"`
	UserPublicKey   string            `json:"user_public_key"`
	Creds           string            `json:"creds"`
	ForeignCreds    string            `json:"foreign_creds"`
}

func must[T any](v T, err error) T {
	if err != nil {
		fmt.Fprintln(os.Stderr, "jwtgen:", err)
		os.Exit(1)
	}
	return v
}

// account returns a new account key pair and its JWT signed by the operator.
func account(operator nkeys.KeyPair, name string) (nkeys.KeyPair, string, string) {
	kp := must(nkeys.CreateAccount())
	pub := must(kp.PublicKey())
	claims := jwt.NewAccountClaims(pub)
	claims.Name = name
	return kp, pub, must(claims.Encode(operator))
}

// creds returns a credentials file for a new user of the account.
func creds(acc nkeys.KeyPair, name string) (string, string) {
	kp := must(nkeys.CreateUser())
	pub := must(kp.PublicKey())
	claims := jwt.NewUserClaims(pub)
	claims.Name = name
	token := must(claims.Encode(acc))
	seed := must(kp.Seed())
	return pub, string(must(jwt.FormatUserConfig(token, seed)))
}

func main() {
	operator := must(nkeys.CreateOperator())
	operatorPub := must(operator.PublicKey())
	_, sysPub, sysJWT := account(operator, "SYS")
	acc, accPub, accJWT := account(operator, "TRADERX")

	oc := jwt.NewOperatorClaims(operatorPub)
	oc.Name = "tradefeed-bridge-test"
	oc.SystemAccount = sysPub
	operatorJWT := must(oc.Encode(operator))

	userPub, userCreds := creds(acc, "bridge")

	// An account signed by another operator: the server knows neither.
	stranger := must(nkeys.CreateOperator())
	foreign, _, _ := account(stranger, "FOREIGN")
	_, foreignCreds := creds(foreign, "stranger")

	out := setup{
		OperatorJWT:     operatorJWT,
		SystemAccount:   sysPub,
		Account:         accPub,
		ResolverPreload: map[string]string{sysPub: sysJWT, accPub: accJWT},
		UserPublicKey:   userPub,
		Creds:           userCreds,
		ForeignCreds:    foreignCreds,
	}
	enc := json.NewEncoder(os.Stdout)
	if err := enc.Encode(out); err != nil {
		fmt.Fprintln(os.Stderr, "jwtgen:", err)
		os.Exit(1)
	}
}
